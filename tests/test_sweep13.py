"""Issue 13, items 8 and 9, swept as an outsider and a careless admin would: hostile configs, URLs,
`reconcile` and `confirm` bodies and ids over loopback HTTP against the local stack (chalice local,
moto_server and the sandboxes, as `python -m sandbox.local_stack` starts them); every answer JSON 4xx
naming the field, never a 500 or a hang, never a secret echoed; an unknown integration and a wrong
secret answered alike on every route an outsider can reach; no secret in the stack's log. Plus the OAuth
clients' redirects (the CRM clients' and Metrika's are tests/test_outbound.py's)."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import requests
from marshmallow import ValidationError

from chalicelib.crm.amocrm.oauth import AmoOAuth
from chalicelib.crm.bitrix24.oauth import Bitrix24OAuth
from chalicelib.errors import ApiError, BridgeError
from chalicelib.ingest import reconcile_since
from chalicelib.integrations import IntegrationConfig
from sandbox.httpserver import Reply
from tests.stacks import local_stack
from tests.test_outbound import Recorder

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_796_000_000
CLIENT_SECRET = "oauth-client-secret-0123456789"
REFRESH = "refresh-token-0123456789abcdef"


# --- fast: the schema and the reconcile body --------------------------------------------------------

def b24(**connection):
    return {"crm": "bitrix24", "counter_id": 1, "metrika_token": "y0_t", "timezone": "Europe/Moscow",
            "connection": {"webhook_url": "https://shop.bitrix24.ru/rest/1/abcdefgh/", "application_token": "x" * 20,
                           **connection}}


def refused(config, *, allow_loopback=False) -> dict:
    with pytest.raises(ValidationError) as error:
        IntegrationConfig(allow_loopback=allow_loopback).load(config)
    return error.value.messages


@pytest.mark.parametrize("url", ["http://10.0.0.5/rest/", "https://169.254.169.254/rest/", "https://[::ffff:127.0.0.1]/",
                                 "https://2130706433/", "https://0x7f.1/", "https://crm.corp.internal/rest/",
                                 "https://evil.example.com/rest/", "http://shop.bitrix24.ru/rest/"])
def test_a_client_endpoint_set_by_hand_follows_the_crm_url_rules(url):
    """It was stored unchecked beside an incoming webhook: `http://10.0.0.5/` and the metadata address
    came back from GET as the portal's address."""
    assert "client_endpoint" in refused(b24(client_endpoint=url))["connection"]


def test_a_client_endpoint_on_an_on_premise_portal_follows_custom_domain():
    IntegrationConfig().load(b24(custom_domain=True, webhook_url="https://crm.shop.ru/rest/1/abcdefgh/",
                                 client_endpoint="https://crm.shop.ru/rest/"))
    IntegrationConfig().load(b24(client_endpoint="https://shop.bitrix24.ru/rest/"))


@pytest.mark.parametrize("field", ["client_id_field", "cost_field"])
@pytest.mark.parametrize("value", [" ", "   ", "\u3000"])
def test_a_blank_field_name_is_refused(field, value):
    assert field in refused({**b24(), field: value})


def amo(**connection):
    return {"crm": "amocrm", "counter_id": 1, "metrika_token": "y0_t", "timezone": "Europe/Moscow",
            "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "a" * 20, "webhook_secret": "s" * 16,
                           **connection}}


@pytest.mark.parametrize("account_id", ["0", "00", "-1", "+1", "1 ", "１", "٣", "9223372036854775808", "9" * 19])
def test_an_account_id_is_an_amocrm_id(account_id):
    assert "account_id" in refused(amo(account_id=account_id))["connection"]


def test_an_account_id_with_leading_zeros_is_one_account_with_the_webhooks_account():
    """"032427762" was stored as sent and every webhook (account[id]=32427762) was refused with a 403."""
    from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
    assert IntegrationConfig().load(amo(account_id="032427762"))["connection"]["account_id"] == "32427762"
    body = b"leads[status][0][id]=7&leads[status][0][status_id]=142&account[id]=%s"
    assert parse_amocrm_webhook(body % b"032427762").account_id == "32427762"
    assert parse_amocrm_webhook(body % b"32427762").account_id == "32427762"


@pytest.mark.parametrize("body, field", [
    ({"since": True}, "since"), ({"since": False}, "since"), ({"since": -1}, "since"), ({"since": 1.5}, "since"),
    ({"since": 1.0}, "since"), ({"since": "1700000000"}, "since"), ({"since": int("9" * 2000)}, "since"),
    ({"since": 4_102_444_800}, "since"),  # 2100: the cursor would skip the window between the last run and now
    ({"since": []}, "since"), ({"since": {}}, "since"), ({"sinse": 1_700_000_000}, "sinse"), ({"since": 1, "x": 2}, "x"),
])
def test_a_reconcile_body_that_is_no_time_is_a_400_naming_the_field(body, field):
    with pytest.raises(ApiError) as error:
        reconcile_since(body, now=NOW)
    assert error.value.status == 400 and field in error.value.details


@pytest.mark.parametrize("body, since", [(None, None), ({}, None), ({"since": None}, None), ({"since": 0}, 0),
                                         ({"since": NOW}, NOW), ({"since": NOW + 60}, NOW + 60)])
def test_a_reconcile_body_with_a_time_passes(body, since):
    assert reconcile_since(body, now=NOW) == since


# --- fast: the OAuth clients do not follow redirects --------------------------------------------------

@pytest.fixture(scope="module")
def servers():
    started = [Recorder().start(), Recorder().start()]
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def redirecting(servers):
    origin, landing = servers
    origin.got.clear()
    landing.got.clear()
    landing.reply = lambda request: Reply(200, {"access_token": "a" * 20, "refresh_token": "r" * 20, "expires_in": 3600,
                                                "member_id": "m1", "client_endpoint": "https://x.bitrix24.ru/rest/"})

    def start(status, same_host=False):
        origin.reply = lambda request: Reply(status, {}, {"Location": "/elsewhere" if same_host else landing.url + request.path})
        return origin, landing
    return start


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("same_host", [False, True])
def test_the_amocrm_oauth_client_follows_no_redirect(redirecting, status, same_host):
    origin, landing = redirecting(status, same_host)
    host = origin.url.split("://", 1)[1]
    oauth = AmoOAuth("client", lambda: CLIENT_SECRET, "https://bridge.example/oauth/amocrm", sandbox_hosts=(host,))
    calls = [lambda: oauth.exchange(origin.url, "code-0123456789"),
             lambda: oauth.refresh({"connection": {"base_url": origin.url}}, REFRESH),
             lambda: oauth.register_webhook(origin.url, "access-token-0123456789", "https://bridge.example/webhooks/amocrm/x")]
    for call in calls:
        with pytest.raises(BridgeError):
            call()
    assert len(origin.got) == len(calls) and landing.got == []
    assert all(request.path != "/elsewhere" for request in origin.got)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("same_host", [False, True])
def test_the_bitrix24_oauth_client_follows_no_redirect(redirecting, status, same_host):
    origin, landing = redirecting(status, same_host)
    with pytest.raises(BridgeError) as error:
        Bitrix24OAuth(origin.url, "client", lambda: CLIENT_SECRET).refresh(REFRESH)
    assert len(origin.got) == 1 and landing.got == [] and origin.got[0].path != "/elsewhere"
    assert "redirect" in error.value.message and CLIENT_SECRET not in error.value.message


# --- over loopback HTTP: the local stack ---------------------------------------------------------------

ADMIN = "sweep13-admin-" + os.urandom(12).hex()
AMO_TOKEN = "demo-token"  # the amoCRM sandbox's demo account
AMO_SECRET = "sweep13-webhook-secret-" + os.urandom(8).hex()
METRIKA_TOKEN = "y0_sweep13-" + os.urandom(8).hex()
B24_CODE = "democode"  # the Bitrix24 sandbox's demo incoming webhook
B24_APP_TOKEN = "sweep13apptoken" + os.urandom(8).hex()
# The banner prints the admin token and the demo accounts' credentials; nothing after it may.
LOGGED_SECRETS = (ADMIN, METRIKA_TOKEN, AMO_SECRET, B24_APP_TOKEN, AMO_TOKEN, f"/rest/1/{B24_CODE}")
TIMEOUT = 20  # a hang is a failure, not a stuck suite


@pytest.fixture(scope="module")
def stack():
    with local_stack({"ADMIN_TOKEN": ADMIN}) as stack:
        api = stack["api"]  # its banner (`stack["banner"]` lines) prints tokens: the log is judged after it
        stack["amo"] = {"crm": "amocrm", "counter_id": 4242, "metrika_token": METRIKA_TOKEN, "timezone": "Europe/Moscow",
                        "connection": {"base_url": stack["amocrm"], "access_token": AMO_TOKEN, "account_id": "32427762",
                                       "webhook_secret": AMO_SECRET}}
        stack["b24"] = {"crm": "bitrix24", "counter_id": 4343, "metrika_token": METRIKA_TOKEN, "timezone": "Europe/Moscow",
                        "connection": {"webhook_url": f"{stack['bitrix24']}/rest/1/{B24_CODE}/",
                                       "application_token": B24_APP_TOKEN}}
        for integration_id, config in (("amo1", stack["amo"]), ("b1", stack["b24"])):
            answer = requests.put(f"{api}/integrations/{integration_id}", json=config, headers=admin(), timeout=TIMEOUT)
            assert answer.status_code == 200, answer.text
        yield stack


def admin(token: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def refused_naming(answer: requests.Response, *fields: str, status: int = 400) -> dict:
    """A JSON 4xx of our one shape that names each of `fields` (in `details` or, for a body's shape, the
    message) and echoes no secret."""
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert isinstance(body, dict) and body.get("error") and body.get("message"), body
    text = json.dumps(body.get("details")) + body["message"]
    for field in fields:
        assert field in text, (field, body)
    for secret in LOGGED_SECRETS:
        assert secret not in answer.text, (secret, answer.text[:300])
    return body


def put(stack, integration_id, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.put(f"{stack['api']}/integrations/{integration_id}", data=data, headers=admin(),
                        timeout=TIMEOUT, **kwargs)


def changed(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return config


@pytest.fixture(scope="module")
def log_checked(stack):
    """The stack's log lines the module's tests produced hold no secret (the worker's too: it runs
    beside). Judged once, after the module's last test, so each test does not wait for the log."""
    yield
    time.sleep(0.5)  # the last request's lines
    produced = "".join(stack["lines"][stack["banner"]:])
    for secret in LOGGED_SECRETS:
        assert secret not in produced, secret


HOSTILE = [None, True, False, 0, -1, 1.5, 2**63, int("9" * 2000), "", " ", "a" * 70_000, "\u0000", "x\r\nSet-Cookie: a=b", "１２３",
           "٣", [], {}, [1], {"a": 1}]
TOP_FIELDS = {"crm": HOSTILE, "counter_id": HOSTILE + ["4242", 4242.0, 2**31, 10**100],
              "metrika_token": [v for v in HOSTILE if v is not None], "timezone": HOSTILE + ["Mars/Olympus"],
              "client_id_field": [v for v in HOSTILE if v not in ("１２３", "٣", None)],
              "hash_pii": [v for v in HOSTILE if not isinstance(v, bool)] + ["false", "true", "0"],
              "currency": HOSTILE[1:] + ["rub", "RUBL"], "phone_region": HOSTILE[1:] + ["ru", "XX", "RUS"],
              "cost_field": [v for v in HOSTILE if v not in ("１２３", "٣", None)],
              "deleted_deal_status": [v for v in HOSTILE if v is not None and v != "１２３" and v != "٣"] + ["a b"],
              "connection": [v for v in HOSTILE if not isinstance(v, dict)]}
AMO_FIELDS = {"base_url": HOSTILE, "access_token": [v for v in HOSTILE if v is not None],
              "webhook_secret": [v for v in HOSTILE if v is not None] + ["short"],
              "account_id": HOSTILE + ["１２３", "٣", "12a", "9" * 20], "auth": HOSTILE + ["oauth", "OAUTH"]}
SWEEP = ([(name, (name,), value) for name, values in TOP_FIELDS.items() for value in values]
         + [(f"connection.{name}", ("connection", name), value) for name, values in AMO_FIELDS.items() for value in values])


def test_a_sweep_of_hostile_config_fields_is_400s_naming_each_field(stack, log_checked):
    assert len(SWEEP) > 200
    problems = []
    for name, path, value in SWEEP:
        answer = put(stack, "amo1", changed(stack["amo"], path, value))
        try:
            refused_naming(answer, path[-1])
        except AssertionError as exc:
            problems.append((name, repr(value)[:40], str(exc)[:300]))
    assert problems == []
    stored = requests.get(f"{stack['api']}/integrations/amo1", headers=admin(), timeout=TIMEOUT).json()
    assert stored["hash_pii"] is False and stored["connection"]["base_url"] == stack["amocrm"]


def test_unknown_fields_extra_depth_and_broken_json_are_400s(stack, log_checked):
    for body, field in [({**stack["amo"], "hash_pii ": True}, "hash_pii "),
                        (changed(stack["amo"], ("connection", "custom_domain"), True), "custom_domain"),
                        ({**stack["amo"], "x" * 300: 1}, "field names"), ({**stack["amo"], "deep": [[[[[[[[[[1]]]]]]]]]]}, "deep"),
                        ('{"crm": "amocrm", "counter_id": 1e999}', "counter_id"), ("{", "JSON"), ("[]", "JSON object"),
                        ('{"counter_id": ' + "9" * 5000 + "}", "JSON"), ('{"crm": NaN}', "JSON"), ('"\\ud800"', "JSON"),
                        (b"\xff\xfe", "JSON")]:
        refused_naming(put(stack, "amo1", body), field)


@pytest.mark.parametrize("url", [
    "http://2130706433", "https://2130706433", "http://0x7f.1", "https://0x7f.0.0.1", "https://0177.0.0.1",
    "https://127.1", "https://[::ffff:127.0.0.1]", "https://[::ffff:a9fe:a9fe]", "https://[fe80::1]",
    "https://[fe80::1%25eth0]", "https://10.0.0.1", "https://169.254.169.254", "https://100.64.0.1", "https://0.0.0.0",
    "https://[::]", "https://[fc00::1]", "https://shop.amocrm.ru.", "https://shop.amocrm.ru..", "https://xn--amocr-4va.ru",
    "https://shop.xn--amocr-4va.ru", "https://ｓｈｏｐ.amocrm.ru", "https://shop.аmocrm.ru", "https://shop.amocrm.ru.evil.com",
    "https://evil.com#.amocrm.ru", "https://evil.com?.amocrm.ru", "https://evil.com\\.amocrm.ru",
    "https://user:pw@shop.amocrm.ru", "https://shop.amocrm.ru@evil.com", "https://:pw@shop.amocrm.ru",
    "https://shop.amocrm.ru:0", "https://shop.amocrm.ru:99999", "https://shop.amocrm.ru:", "http://shop.amocrm.ru",
    "HTTP://SHOP.AMOCRM.RU", "ftp://shop.amocrm.ru", "file:///etc/passwd", "javascript:alert(1)", "https:shop.amocrm.ru",
    "https:///shop.amocrm.ru", " https://shop.amocrm.ru", "https://shop.amocrm.ru\t", "https://shop.amocrm.ru%00",
    "https://shop%2eamocrm.ru", "https://amocrm.ru", "https://a.b.amocrm.ru", "https://shop.amocrm.ru/api",
    "https://metadata.google.internal", "https://shop.bitrix24.ru", "https://shop.localhost", "https://localhost.",
])
def test_hostile_crm_urls_are_400s_naming_the_field(stack, log_checked, url):
    refused_naming(put(stack, "amo1", changed(stack["amo"], ("connection", "base_url"), url)), "base_url")
    if url == "https://shop.bitrix24.ru":
        return  # a portal: not amoCRM's, Bitrix24's own
    webhook_url = url.rstrip("/") + "/rest/1/abcdefgh/"
    for custom_domain in (False, True):
        if custom_domain and url in ("https://amocrm.ru", "https://a.b.amocrm.ru", "https://shop.amocrm.ru.evil.com",
                                     "https://xn--amocr-4va.ru", "https://shop.xn--amocr-4va.ru", "https://shop.bitrix24.ru",
                                     "https://shop.amocrm.ru/api"):
            continue  # public names (or, with a path, no longer this URL's host): what custom_domain is for
        config = changed(stack["b24"], ("connection", "webhook_url"), webhook_url)
        config["connection"]["custom_domain"] = custom_domain
        refused_naming(put(stack, "b1", config), "webhook_url")
        config = changed(stack["b24"], ("connection", "client_endpoint"), url.rstrip("/") + "/rest/")
        config["connection"]["custom_domain"] = custom_domain
        refused_naming(put(stack, "b1", config), "client_endpoint")


def test_a_stored_secret_never_follows_a_new_endpoint_over_the_wire(stack, log_checked):
    api = stack["api"]
    for leave_out in (False, True):
        config = changed(stack["amo"], ("connection", "base_url"), "https://other.amocrm.ru")
        for key in ("access_token", "webhook_secret"):
            if leave_out:
                del config["connection"][key]
            else:
                config["connection"][key] = "********"
        body = refused_naming(put(stack, "amo1", config), "connection.access_token", "connection.webhook_secret")
        assert "base_url changed" in json.dumps(body["details"])
        # The same host spelled as localhost is another origin: refused too.
        config["connection"]["base_url"] = stack["amocrm"].replace("127.0.0.1", "localhost")
        refused_naming(put(stack, "amo1", config), "connection.access_token")
    b24 = changed(stack["b24"], ("connection", "webhook_url"), "https://other.bitrix24.ru/rest/1/newcode123/")
    b24["connection"]["application_token"] = "********"
    refused_naming(put(stack, "b1", b24), "connection.application_token")
    assert put(stack, "b1", changed(stack["b24"], ("connection", "member_id"), "portal-one")).status_code == 200
    b24 = changed(stack["b24"], ("connection", "webhook_url"), "********")
    b24["connection"].update(application_token="********", member_id="another-portal")
    refused_naming(put(stack, "b1", b24), "connection.webhook_url", "connection.application_token")
    assert put(stack, "b1", stack["b24"]).status_code == 200
    stored = requests.get(f"{api}/integrations/amo1", headers=admin(), timeout=TIMEOUT).json()
    assert stored["connection"]["base_url"] == stack["amocrm"]
    # The same endpoint keeps them: GET, edit a field, PUT back.
    stored["currency"] = "USD"
    assert put(stack, "amo1", stored).status_code == 200
    assert put(stack, "amo1", stack["amo"]).status_code == 200


def test_typed_fields_keep_their_validated_value_over_the_wire(stack, log_checked):
    refused_naming(put(stack, "amo1", {**stack["amo"], "hash_pii": "false"}), "hash_pii")
    saved = put(stack, "amo1", {**stack["amo"], "hash_pii": True})
    assert saved.status_code == 200 and saved.json()["hash_pii"] is True
    stored = requests.get(f"{stack['api']}/integrations/amo1", headers=admin(), timeout=TIMEOUT).json()
    assert stored["hash_pii"] is True
    assert put(stack, "amo1", stack["amo"]).json()["hash_pii"] is False


@pytest.mark.parametrize("integration_id", ["amo1", "b1"])
def test_reconcile_bodies_over_the_wire(stack, log_checked, integration_id):
    url = f"{stack['api']}/integrations/{integration_id}/reconcile"
    for raw, field in [('{"since": true}', "since"), ('{"since": false}', "since"), ('{"since": -1}', "since"),
                       ('{"since": 1.5}', "since"), ('{"since": 1e3}', "since"), ('{"since": "1700000000"}', "since"),
                       ('{"since": ' + "9" * 2000 + "}", "since"), ('{"since": 4102444800}', "since"),
                       ('{"since": [1]}', "since"), ('{"since": {"$gt": 0}}', "since"), ('{"sinse": 1700000000}', "sinse"),
                       ('{"since": 1, "all": true}', "all"), ('{"since": ' + "9" * 5000 + "}", "JSON"),
                       ('{"since": NaN}', "JSON"), ('{"since": 1e999}', "since"), ("[]", "JSON object"), ('"x"', "JSON object"),
                       ("{", "JSON")]:
        refused_naming(requests.post(url, data=raw, headers=admin(), timeout=TIMEOUT), field)
    answer = requests.post(url, data='{"since": 0}', headers=admin(), timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.json()["since"] == 0, answer.text  # not -120 sent to the CRM
    assert requests.post(url, headers=admin(), timeout=TIMEOUT).status_code == 200


def test_confirm_bodies_and_hostile_ids_over_the_wire(stack, log_checked):
    api = stack["api"]
    for raw in ["[]", '"x"', "1", '{"a": 1}', '{"since": 1}', "{", "9" * 2000, '{"x": NaN}']:
        refused_naming(requests.post(f"{api}/integrations/amo1/confirm", data=raw, headers=admin(), timeout=TIMEOUT),
                       "JSON" if raw in ("{", '{"x": NaN}') else "body")
    for bad in ["a" * 65, "a" * 3000, "%D1%88", "a%20b", "a.b", "%00", "..", "a%2Fb"]:
        for method, path in [("GET", ""), ("PUT", ""), ("POST", "/confirm"), ("POST", "/reconcile"), ("GET", "/status")]:
            answer = requests.request(method, f"{api}/integrations/{bad}{path}", headers=admin(), data="{}",
                                      timeout=TIMEOUT)
            assert answer.status_code in (400, 403, 404) and answer.headers["Content-Type"].startswith("application/json"), \
                (method, bad, path, answer.status_code, answer.text[:200])
            if answer.status_code == 400:
                refused_naming(answer, "integration")


def test_what_an_admin_reads_holds_no_secret(stack, log_checked):
    api = stack["api"]
    for path in ("/integrations", "/integrations/amo1", "/integrations/b1", "/integrations/amo1/summary",
                 "/integrations/b1/summary", "/integrations/amo1/status", "/integrations/b1/status"):
        answer = requests.get(api + path, headers=admin(), timeout=TIMEOUT)
        assert answer.status_code == 200, (path, answer.text[:300])
        assert not [secret for secret in LOGGED_SECRETS if secret in answer.text], path


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def outsider_answer(answer: requests.Response) -> tuple:
    """What an outsider sees: status, headers (less Date and length) and body (less the request id the
    gateway's own answers carry)."""
    body = answer.json()
    assert isinstance(body, dict) and answer.status_code in (401, 403), (answer.status_code, body)
    body.pop("request_id", None)
    headers = {k.lower(): v for k, v in answer.headers.items() if k.lower() not in ("date", "content-length")}
    return answer.status_code, tuple(sorted(headers.items())), json.dumps(body, sort_keys=True)


def test_an_unknown_integration_and_a_wrong_secret_answer_alike_on_every_outside_route(stack, log_checked):
    api = stack["api"]
    amo_body = "leads[status][0][id]=1&leads[status][0][status_id]=142&leads[status][0][pipeline_id]=1&account[id]=32427762"
    amo = [requests.post(f"{api}/webhooks/amocrm/{iid}{query}", data=amo_body, headers=FORM, timeout=TIMEOUT)
           for iid in ("amo1", "nosuch", "b1") for query in ("", "?secret=wrong-secret-0123456789", f"?secret={AMO_SECRET}x")]
    amo.append(requests.post(f"{api}/webhooks/amocrm/nosuch?secret={AMO_SECRET}", data=amo_body, headers=FORM, timeout=TIMEOUT))
    assert len({outsider_answer(a) for a in amo}) == 1 and amo[0].status_code == 403
    b24_body = ("event=ONCRMDEALUPDATE&data[FIELDS][ID]=5&ts=1700000000&auth[application_token]={}"
                "&auth[member_id]=m&auth[domain]=x.bitrix24.ru")
    b24 = [requests.post(f"{api}/webhooks/bitrix24/{iid}", data=b24_body.format(token), headers=FORM, timeout=TIMEOUT)
           for iid in ("b1", "nosuch", "amo1") for token in ("wrongtoken0123456789", B24_APP_TOKEN + "x")]
    b24.append(requests.post(f"{api}/webhooks/bitrix24/nosuch", data=b24_body.format(B24_APP_TOKEN), headers=FORM,
                             timeout=TIMEOUT))
    assert len({outsider_answer(a) for a in b24}) == 1 and b24[0].status_code == 403
    unsigned = [requests.post(f"{api}/webhooks/bitrix24/{iid}", data="event=ONCRMDEALUPDATE&data[FIELDS][ID]=5",
                              headers=FORM, timeout=TIMEOUT) for iid in ("b1", "nosuch")]
    assert len({outsider_answer(a) for a in unsigned}) == 1
    events = [requests.post(f"{api}/install/bitrix24/events", headers=FORM, timeout=TIMEOUT,
                            data=f"event={event}&auth[application_token]={token}&auth[member_id]={member}")
              for event in ("ONAPPUNINSTALL", "ONOFFLINEEVENT") for token in ("t" * 32, B24_APP_TOKEN)
              for member in ("unknownmember", "!!", "m" * 100, "")]
    assert len({outsider_answer(a) for a in events}) == 1 and events[0].status_code == 403
    disable = [requests.get(f"{api}/oauth/amocrm/disable", params=query, timeout=TIMEOUT)
               for query in ({}, {"account_id": "32427762", "client_uuid": "x", "signature": "0" * 64},
                             {"account_id": "1", "client_uuid": "x", "signature": "0" * 64}, {"account_id": "abc"})]
    assert len({outsider_answer(a) for a in disable}) == 1 and disable[0].status_code == 403
    # Console links and the admin token: a forged or foreign one is the same 403 for an existing
    # integration and for none.
    link = requests.post(f"{api}/integrations/amo1/console-links", headers=admin(), json={}, timeout=TIMEOUT).json()
    token = link["link"].split("link=", 1)[1]
    forged = token.rsplit(".", 1)[0] + ".x" + token.rsplit(".", 1)[1][1:]
    tries = [requests.get(f"{api}/integrations/{iid}{path}", headers={"Authorization": f"Bearer {bearer}"}, timeout=TIMEOUT)
             for iid in ("b1", "nosuch") for path in ("", "/summary", "/delivery")
             for bearer in (token, forged, "cl1." + iid + ".0000000000000000." + "A" * 43, "not-the-admin-token")]
    assert len({outsider_answer(a) for a in tries}) == 1 and tries[0].status_code == 403
    assert requests.delete(f"{api}/integrations/amo1/console-links/{link['link_id']}", headers=admin(),
                           timeout=TIMEOUT).status_code == 200


# --- ids are ASCII digits, wherever one is read -------------------------------------------------------

@pytest.mark.parametrize("record_id", ["١٢", "²", "１２"])
def test_an_offline_event_id_that_is_no_ascii_number_is_not_cleared_as_one(record_id):
    """event.offline.clear got "١٢" (str.isdigit() is true for it) beside the real ids."""
    from chalicelib.crm.bitrix24.app_events import parse_offline_page
    page = parse_offline_page({"process_id": "p", "events": [
        {"ID": record_id, "EVENT_NAME": "ONCRMDEALUPDATE", "EVENT_DATA": {"FIELDS": {"ID": "5"}}},
        {"ID": "7", "EVENT_NAME": "ONCRMDEALUPDATE", "EVENT_DATA": {"FIELDS": {"ID": "6"}}}]}, now=NOW)
    assert page.record_ids == ["7"]


def test_a_field_named_with_non_ascii_digits_is_matched_by_name():
    from chalicelib.crm.amocrm.translate import field_values
    fields = [{"field_id": 3, "field_name": "٣", "values": [{"value": "by name"}]},
              {"field_id": 2, "field_name": "x", "values": [{"value": "by id"}]}]
    assert field_values(fields, "٣") == ["by name"] and field_values(fields, "2") == ["by id"]
