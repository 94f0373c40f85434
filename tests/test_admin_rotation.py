"""Admin token rotation (chalicelib/admin.py): the SSM SecureString on moto_server over loopback, a
settable clock, and the authorizer through the Chalice app.

Rotation: `put-parameter --overwrite` once → the new token works at once, the old one until the new
version's LastModifiedDate + the overlap. Revocation: overwrite twice with the same value → the old one
is never consulted again. SSM unreachable → a refusal (403), never an exception (a 500)."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chalicelib.admin import (AUTHORIZER_CACHE_SECONDS, MISS_REREAD_SECONDS, PARAMETER_TTL_SECONDS,
                              STALE_LIMIT_SECONDS, AdminTokenCache, AdminTokens, admin_tokens, bearer_token)
from chalicelib.errors import Unavailable
from chalicelib.settings import load_settings

OVERLAP = 900
DEV_CONFIG = json.loads((Path(__file__).resolve().parent.parent / ".chalice" / "config.json").read_text())["stages"]["dev"]


class Clock:
    """Wall time to start with (SSM's LastModifiedDate is wall time), then moved by the test."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class Counting:
    """An SSM client that counts GetParameter calls, and can be pointed at a dead endpoint."""

    def __init__(self, client) -> None:
        self.client, self.names = client, []

    def get_parameter(self, **kwargs):
        self.names.append(kwargs["Name"])
        return self.client.get_parameter(**kwargs)


def dead_ssm():
    """Nothing listens on the port: every call fails to connect, at once."""
    from sandbox.local_stack import EMULATOR_ENV, free_port
    return boto3.client("ssm", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name=EMULATOR_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(connect_timeout=0.2, read_timeout=0.2, retries={"total_max_attempts": 1}))


@pytest.fixture
def ssm(service_env, moto_url):
    return boto3.client("ssm", endpoint_url=moto_url)


@pytest.fixture
def name():
    return f"/metrika-crm-bridge/test-{uuid.uuid4().hex[:8]}/admin-token"


def put(ssm, name, value):
    ssm.put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)
    return ssm.get_parameter(Name=name)["Parameter"]["LastModifiedDate"].timestamp()


def tokens(ssm, name, clock):
    settings = load_settings({"ADMIN_TOKEN_PARAMETER": name, "ADMIN_TOKEN_OVERLAP_SECONDS": str(OVERLAP)})
    return admin_tokens(settings, ssm=ssm, clock=clock)


def bearer(token):
    return f"Bearer {token}"


def test_rotation_new_token_at_once_old_token_until_the_overlap_ends(ssm, name):
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    put(ssm, name, old)
    clock, client = Clock(), Counting(ssm)
    cache = tokens(client, name, clock)
    assert cache.is_admin(bearer(old))
    rotated_at = put(ssm, name, new)
    clock.t += 1  # well inside the 60 s the container trusts its read: only the unknown token re-reads
    assert cache.is_admin(bearer(new))
    assert cache.is_admin(bearer(old))  # the overlap: scripts still holding the old token keep working
    assert client.names == [name, name, f"{name}:1"]  # the previous version read by its number
    clock.t = rotated_at + OVERLAP - 1
    assert cache.is_admin(bearer(old)) and cache.is_admin(bearer(new))
    clock.t = rotated_at + OVERLAP + 1
    assert not cache.is_admin(bearer(old))  # refused by the clock, whatever the cache holds
    assert cache.is_admin(bearer(new))
    fresh = tokens(Counting(ssm), name, clock)  # a cold container after the overlap
    assert fresh.is_admin(bearer(new)) and not fresh.is_admin(bearer(old))


def revoke_a_leaked_token(ssm, name):
    """A warm container trusts a leaked token; then the runbook's immediate revocation (two overwrites
    with the same new value). (leaked, new, clock, warm)."""
    leaked, new = "leaked-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    put(ssm, name, leaked)
    clock = Clock()
    warm = tokens(ssm, name, clock)
    assert warm.is_admin(bearer(leaked))
    put(ssm, name, new)
    put(ssm, name, new)
    return leaked, new, clock, warm


def test_immediate_revocation_is_two_overwrites_with_the_same_value(ssm, name):
    leaked, new, clock, warm = revoke_a_leaked_token(ssm, name)
    cold = tokens(ssm, name, clock)
    assert cold.is_admin(bearer(new)) and not cold.is_admin(bearer(leaked))  # no overlap at all
    # A warm container trusts its last read for at most PARAMETER_TTL_SECONDS (the documented bound).
    assert warm.is_admin(bearer(new))  # unknown to its cache: re-read at once
    assert not warm.is_admin(bearer(leaked))  # ... and that re-read already dropped the leaked token
    clock.t += PARAMETER_TTL_SECONDS
    assert not warm.is_admin(bearer(leaked)) and warm.is_admin(bearer(new))


def test_warm_container_drops_a_revoked_token_after_its_ttl(ssm, name):
    leaked, _, clock, warm = revoke_a_leaked_token(ssm, name)
    clock.t += PARAMETER_TTL_SECONDS - 1
    assert warm.is_admin(bearer(leaked))  # its read is still fresh: the bound README documents
    clock.t += 1
    assert not warm.is_admin(bearer(leaked))


def test_unknown_tokens_reread_at_most_once_per_interval(ssm, name):
    put(ssm, name, "right-" + uuid.uuid4().hex)
    clock, client = Clock(), Counting(ssm)
    cache = tokens(client, name, clock)
    assert not any(cache.is_admin(bearer(f"guess-{i}")) for i in range(50))
    assert len(client.names) == 2  # the first read, and one early re-read for the first unknown token
    clock.t += MISS_REREAD_SECONDS - 0.1
    assert not cache.is_admin(bearer("guess-again")) and len(client.names) == 2
    clock.t += 0.1
    assert not cache.is_admin(bearer("guess-again")) and len(client.names) == 3
    assert not cache.is_admin(None) and not cache.is_admin("Basic x") and len(client.names) == 3  # no token: no read


def test_ssm_down_on_a_cold_start_refuses_and_logs_no_token(captured_logs):
    token = "t-" + uuid.uuid4().hex
    cache = tokens(dead_ssm(), "/metrika-crm-bridge/x/admin-token", Clock())
    assert cache.is_admin(bearer(token)) is False
    lines = [r.getMessage() for r in captured_logs.records if "admin_token_unreadable" in r.getMessage()]
    assert lines and json.loads(lines[0])["error"].startswith("ssm unavailable")
    assert token not in captured_logs.text


def test_ssm_down_later_keeps_the_last_tokens_for_the_stale_limit(ssm, name):
    token = "t-" + uuid.uuid4().hex
    put(ssm, name, token)
    clock, client = Clock(), Counting(ssm)
    cache = tokens(client, name, clock)
    assert cache.is_admin(bearer(token))
    client.client = dead_ssm()
    clock.t += PARAMETER_TTL_SECONDS
    assert cache.is_admin(bearer(token))  # the re-read failed: the last good read still serves
    clock.t += STALE_LIMIT_SECONDS - PARAMETER_TTL_SECONDS - 1
    assert cache.is_admin(bearer(token))
    clock.t += 2
    assert not cache.is_admin(bearer(token))  # 10 minutes without a good read: refuse everyone
    client.client = ssm
    clock.t += MISS_REREAD_SECONDS
    assert cache.is_admin(bearer(token))  # SSM back: the next attempt reads again


def test_a_deleted_parameter_is_no_token_not_an_outage(ssm, name, captured_logs):
    """SSM answering "no such parameter" is an answer, not SSM down: the warm container's last read is
    not kept for the stale limit (10 minutes), so deleting the parameter refuses every token within the
    read's TTL, as a revocation does. Written again, the new token works at its first request."""
    token = "t-" + uuid.uuid4().hex
    put(ssm, name, token)
    clock = Clock()
    warm = tokens(ssm, name, clock)
    assert warm.is_admin(bearer(token))
    ssm.delete_parameter(Name=name)
    clock.t += PARAMETER_TTL_SECONDS
    assert not warm.is_admin(bearer(token))
    assert not tokens(ssm, name, clock).is_admin(bearer(token))  # a cold container: refused too
    logged = [json.loads(r.getMessage()) for r in captured_logs.records if "admin_token_missing" in r.getMessage()]
    assert logged and logged[0]["parameter"] == name and token not in captured_logs.text
    again = "again-" + uuid.uuid4().hex
    put(ssm, name, again)  # version 1 of a new parameter
    clock.t += MISS_REREAD_SECONDS
    assert warm.is_admin(bearer(again)) and not warm.is_admin(bearer(token))


def test_a_rotation_during_the_two_reads_never_pairs_wrong_versions(ssm, name):
    """The previous token is read by version number: a put between the two reads cannot make the
    token before last valid."""
    first, second, third = (f"{label}-{uuid.uuid4().hex}" for label in ("first", "second", "third"))
    put(ssm, name, first)
    put(ssm, name, second)

    class RotatesBetweenReads(Counting):
        def get_parameter(self, **kwargs):
            answer = super().get_parameter(**kwargs)
            if len(self.names) == 1:
                put(ssm, name, third)  # lands after the current version was read
            return answer

    cache = tokens(RotatesBetweenReads(ssm), name, Clock())
    assert cache.is_admin(bearer(second)) and cache.is_admin(bearer(first))  # versions 2 and 1, as read
    assert not cache.is_admin(bearer("x" * 64))


def test_an_unreadable_previous_version_drops_only_the_overlap(ssm, name, captured_logs):
    """The previous token is a grace: refused for it (or throttled), the current token still works."""
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    put(ssm, name, old)
    put(ssm, name, new)

    class NoHistory(Counting):
        def get_parameter(self, **kwargs):
            if kwargs["Name"] != name:
                raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetParameter")
            return super().get_parameter(**kwargs)

    cache = tokens(NoHistory(ssm), name, Clock())
    assert cache.is_admin(bearer(new)) and not cache.is_admin(bearer(old))
    logged = [json.loads(r.getMessage()) for r in captured_logs.records if "previous_unreadable" in r.getMessage()]
    assert logged and logged[0]["error"] == "AccessDeniedException" and logged[0]["version"] == 1
    assert old not in captured_logs.text and new not in captured_logs.text


def test_tokens_compare_whole_and_blank_values_accept_nobody():
    now = 1_750_000_000.0
    tokens_ = AdminTokens.of("  secret-token\n", "older", previous_until=now + 10)
    assert tokens_.accepts("secret-token", now) and tokens_.accepts("older", now)
    assert not tokens_.accepts("older", now + 10)  # the overlap's end is exclusive
    for wrong in ("secret-toke", "secret-token2", "SECRET-TOKEN", "", "\ud800", "x" * 10_000):
        assert not tokens_.accepts(wrong, now)
    assert not AdminTokens.of("   ").accepts("", now) and not AdminTokens.of(None).accepts("None", now)
    same = AdminTokens.of("new", "new", previous_until=now + 10)  # a revocation: nothing before "new"
    assert same.previous is None and same.accepts("new", now)
    assert bearer_token("bearer  tok ") == "tok" and bearer_token("Bearer") is None
    assert bearer_token(None) is None and bearer_token("Basic tok") is None and bearer_token("tok") is None


def test_a_bug_in_the_read_propagates_but_unavailable_refuses():
    def broken(now):
        raise KeyError("Parameter")

    with pytest.raises(KeyError):
        AdminTokenCache(broken).is_admin("Bearer x")

    def down(now):
        raise Unavailable("ssm", "ThrottlingException")

    assert AdminTokenCache(down).is_admin("Bearer x") is False


# --- the authorizer in the app ---------------------------------------------------------------------

@pytest.fixture
def ssm_app(app_client, monkeypatch, moto_url):
    """The app's authorizer reading the dev stage's parameter (named in .chalice/config.json) from
    moto_server's SSM, as in AWS: no ADMIN_TOKEN."""
    import app as app_module
    from chalicelib.settings import get_settings
    monkeypatch.delenv("ADMIN_TOKEN")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", moto_url)
    monkeypatch.setattr(app_module, "_ADMIN_TOKENS", None)
    get_settings.cache_clear()
    yield app_client
    monkeypatch.undo()
    get_settings.cache_clear()


def test_authorizer_result_ttl_is_set():
    import app as app_module
    (handler,) = [h for h in app_module.app.builtin_auth_handlers if h.name == "admin"]
    assert handler.ttl_seconds == AUTHORIZER_CACHE_SECONDS == 60


def test_authorizer_reads_the_rotated_parameter(ssm_app, service_env, moto_url, integration_id):
    ssm = boto3.client("ssm", endpoint_url=moto_url)
    parameter = DEV_CONFIG["environment_variables"]["ADMIN_TOKEN_PARAMETER"]
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    put(ssm, parameter, old)
    path = f"/integrations/{integration_id}"
    assert ssm_app.http.get(path, headers={"Authorization": bearer(old)}).status_code == 404  # admitted
    put(ssm, parameter, new)
    assert ssm_app.http.get(path, headers={"Authorization": bearer(new)}).status_code == 404
    assert ssm_app.http.get(path, headers={"Authorization": bearer(old)}).status_code == 404  # overlap
    assert ssm_app.http.get(path, headers={"Authorization": bearer("wrong")}).status_code == 403


def test_authorizer_refuses_when_ssm_is_down(ssm_app, monkeypatch, integration_id):
    from sandbox.local_stack import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", f"http://127.0.0.1:{free_port()}")
    response = ssm_app.http.get(f"/integrations/{integration_id}", headers={"Authorization": bearer("any")})
    assert response.status_code == 403  # a refusal, not a 500
