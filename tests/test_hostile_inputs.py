"""Hostile inputs at the pure level: the webhook parsers (bytes in, references out) and
`save_integration` with an in-memory store. Each input is either accepted (the case says what comes
out) or refused with `WebhookError` / `ApiError` 400 naming the offending field — never any other
exception, which the app would turn into a 500 (or, before, a 503 that amoCRM retries forever).

Cases marked REGRESSION passed through, or raised something else, before this sweep."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, WebhookError
from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
from chalicelib.crm.bitrix24.webhook import MissingCredentials, parse_bitrix24_event
from chalicelib.crm.form import MAX_KEY_LENGTH, MAX_KEYS, parse_bracket_form
from chalicelib.errors import ApiError, Misconfigured, Transient
from chalicelib.integrations import CONNECTION_SCHEMAS, IntegrationConfig, save_integration

NOW = 1790000000
MB = 1_000_000
HUGE_ID = "9" * 2000
ACCOUNT = "account[subdomain]=example&account[id]=32427762"


@dataclass
class Ok:
    """Accepted; `check` gets the result."""
    check: Callable[[Any], bool] = lambda result: True


@dataclass
class Refused:
    """`WebhookError` (or `ApiError` 400) whose message or details name `field`."""
    field: str
    credentials: bool = False  # Bitrix24: MissingCredentials, which the ingest layer answers with 401


def amo(*parts: str, account: bool = True) -> bytes:
    return "&".join(([ACCOUNT] if account else []) + list(parts)).encode()


def b24(*parts: str, token: bool = True, event: str | None = "ONCRMDEALUPDATE") -> bytes:
    head = ([f"event={event}"] if event is not None else []) + (
        ["auth[application_token]=apptoken", "auth[member_id]=7f3c2a9b", "auth[domain]=acme.bitrix24.ru"]
        if token else [])
    return "&".join(head + list(parts)).encode()


def refs(*expected: tuple) -> Callable[[Any], bool]:
    return lambda result: [(r.kind, r.crm_id, r.event_time) for r in result.refs] == list(expected)


def deep_key(levels: int) -> str:
    return "leads" + "[x]" * levels


AMOCRM = [
    # ids
    ("REGRESSION 2,000-digit id as the second entity", amo("leads[add][0][id]=1", f"leads[add][1][id]={HUGE_ID}"),
     Refused("leads[add][1][id]")),
    ("REGRESSION 2,000-digit id in a status change", amo("leads[status][0][id]=5", f"leads[status][1][id]={HUGE_ID}"),
     Refused("leads[status][1][id]")),
    ("20-digit id", amo("leads[update][0][id]=" + "1" * 20), Refused("leads[update][0][id]")),
    ("2^63 does not fit a signed 64-bit id", amo("leads[update][0][id]=9223372036854775808"), Refused("leads[update][0][id]")),
    ("2^63-1 is the largest id", amo("leads[update][0][id]=9223372036854775807"),
     Ok(refs((ORDER, "9223372036854775807", NOW)))),
    ("id with a space", amo("leads[update][0][id]=+5"), Refused("leads[update][0][id]")),
    ("id with a trailing space", amo("leads[update][0][id]=5%20"), Refused("leads[update][0][id]")),
    ("full-width digits", amo("leads[update][0][id]=" + quote("５")), Refused("leads[update][0][id]")),
    ("Arabic-Indic digits", amo("leads[update][0][id]=" + quote("٣٤")), Refused("leads[update][0][id]")),
    ("superscript two", amo("leads[update][0][id]=" + quote("²")), Refused("leads[update][0][id]")),
    ("negative id", amo("leads[update][0][id]=-5"), Refused("leads[update][0][id]")),
    ("float id", amo("leads[update][0][id]=5.0"), Refused("leads[update][0][id]")),
    ("exponent id", amo("leads[update][0][id]=1e3"), Refused("leads[update][0][id]")),
    ("empty id", amo("leads[update][0][id]="), Refused("leads[update][0][id]")),
    ("id 0", amo("leads[update][0][id]=0"), Refused("leads[update][0][id]")),
    ("leading zeros are one entity", amo("leads[update][0][id]=007"), Ok(refs((ORDER, "7", NOW)))),
    ("NUL id", amo("leads[update][0][id]=%00"), Refused("leads[update][0][id]")),
    ("id with a NUL after it", amo("leads[update][0][id]=5%00"), Refused("leads[update][0][id]")),
    ("a subtree where the id belongs", amo("leads[update][0][id][x]=5"), Refused("leads[update][0][id]")),
    ("bare id as the action's value", amo("leads[delete]=6"), Ok(refs((ORDER, "6", NOW)))),
    ("bare non-id as the action's value", amo("leads[delete]=x"), Refused("leads[delete]")),
    ("scalar where an item belongs is a bare id", amo("leads[add][0]=1"), Ok(refs((ORDER, "1", NOW)))),
    ("item without an id", amo("leads[add][0][name]=x"), Refused("leads[add][0][id]")),
    ("linked lead keyed by a 2,000-digit id",
     amo("contacts[add][0][id]=9", f"contacts[add][0][linked_leads_id][{HUGE_ID}][ID]=1"),
     Refused("contacts[add][0][linked_leads_id]")),
    ("linked lead keyed by a word", amo("contacts[add][0][id]=9", "contacts[add][0][linked_leads_id][abc][ID]=1"),
     Refused("contacts[add][0][linked_leads_id][abc]")),
    ("linked leads as a scalar are nothing", amo("contacts[add][0][id]=9", "contacts[add][0][linked_leads_id]=abc"),
     Ok(refs((CONTACT, "9", NOW)))),
    ("unsorted lead_id superscript", amo("unsorted[add][0][uid]=u", "unsorted[add][0][lead_id]=" + quote("²")),
     Refused("unsorted[add][0][lead_id]")),
    ("unsorted lead_id 2,000 digits", amo("unsorted[add][0][uid]=u", f"unsorted[add][0][lead_id]={HUGE_ID}"),
     Refused("unsorted[add][0][lead_id]")),
    ("account[id] not a number", amo("account[id]=abc", account=False) + b"&account[subdomain]=x", Refused("account[id]")),
    ("account[id] a subtree", b"account[subdomain]=x&account[id][y]=1", Refused("account[id]")),
    ("account[id] 2,000 digits", f"account[id]={HUGE_ID}".encode(), Refused("account[id]")),
    ("account[subdomain] a subtree only", b"account[subdomain][x]=1", Refused("account")),
    # times
    ("REGRESSION 10^40 updated_at", amo("leads[update][0][id]=5", "leads[update][0][updated_at]=1" + "0" * 40),
     Refused("leads[update][0][updated_at]")),
    ("REGRESSION superscript updated_at", amo("leads[update][0][id]=5", "leads[update][0][updated_at]=" + quote("²")),
     Refused("leads[update][0][updated_at]")),
    ("13-digit updated_at (milliseconds)", amo("leads[update][0][id]=5", "leads[update][0][updated_at]=1790000000000"),
     Refused("leads[update][0][updated_at]")),
    ("negative last_modified", amo("leads[update][0][id]=5", "leads[update][0][last_modified]=-1"),
     Refused("leads[update][0][last_modified]")),
    ("good updated_at, bad last_modified", amo("leads[update][0][id]=5", "leads[update][0][updated_at]=1790000001",
                                               "leads[update][0][last_modified]=x"), Refused("leads[update][0][last_modified]")),
    ("updated_at a subtree", amo("leads[update][0][id]=5", "leads[update][0][updated_at][x]=1"),
     Refused("leads[update][0][updated_at]")),
    ("contact time 10^40", amo("contacts[update][0][id]=5", "contacts[update][0][updated_at]=1" + "0" * 40),
     Refused("contacts[update][0][updated_at]")),
    ("year 2100 is the ingest layer's business", amo("leads[update][0][id]=5", "leads[update][0][updated_at]=4102444800"),
     Ok(refs((ORDER, "5", 4102444800)))),
    ("empty updated_at means the receipt time", amo("leads[update][0][id]=5", "leads[update][0][updated_at]="),
     Ok(refs((ORDER, "5", NOW)))),
    # shapes
    ("empty body", b"", Refused("account")),
    ("only account", amo(), Ok(lambda hook: hook.refs == [] and hook.ignored == 0 and hook.account_id == "32427762")),
    ("no account", amo("leads[add][0][id]=1", account=False), Refused("account")),
    ("scalar where the entity's actions belong", amo("leads=1"), Ok(lambda hook: hook.refs == [] and hook.ignored == 1)),
    ("list-like keys `a[]`", amo("leads[add][][id]=1", "leads[add][][id]=2"), Ok(refs((ORDER, "2", NOW)))),
    ("items of kinds we do not sync are not checked", amo(f"task[add][0][id]={HUGE_ID}", "leads[note][0][id]=x"),
     Ok(lambda hook: hook.refs == [] and hook.ignored == 2)),
    ("key 1,000 levels deep", amo(deep_key(1000) + "=1"), Refused("nested deeper")),
    ("key 11 levels deep", amo(deep_key(11) + "=1"), Refused("nested deeper")),
    ("key 10 levels deep parses", amo("leads[update][0][id]=5", "leads[update][0]" + "[x]" * 8 + "=1"),
     Ok(refs((ORDER, "5", NOW)))),
    ("unbalanced `[`", amo("leads[add[0][id]=1"), Refused("leads[add[0][id]")),
    ("unbalanced `]`", amo("leads]add[=1"), Refused("unbalanced")),
    ("text after the brackets", amo("leads[add][0]x[id]=1"), Refused("unbalanced")),
    ("empty key", amo("=1"), Ok(lambda hook: hook.ignored == 1)),
    ("empty field between `&&`", amo("", "leads[add][0][id]=1"), Refused("form-encoded")),
    ("field without `=`", amo("leads"), Refused("form-encoded")),
    ("one field too many", b"&".join([amo()] + [b"f%d=v" % i for i in range(MAX_KEYS - 1)]),
     Refused(f"{MAX_KEYS + 1} form fields; the limit is {MAX_KEYS}")),
    ("as many fields as allowed", b"&".join([amo()] + [b"f%d=v" % i for i in range(MAX_KEYS - 2)]),
     Ok(lambda hook: hook.ignored == MAX_KEYS - 2)),
    ("raw non-UTF-8 bytes", amo("leads[add][0][name]=") + b"\xff\xfe", Refused("UTF-8")),
    ("percent-encoded non-UTF-8 is text", amo("leads[add][0][id]=1", "leads[add][0][name]=%FF%FE"), Ok(refs((ORDER, "1", NOW)))),
    ("raw NUL in a key", amo("le\x00ads[add][0][id]=1"), Ok(lambda hook: hook.refs == [] and hook.ignored == 1)),
    ("raw NUL in an id", amo("leads[add][0][id]=1\x00"), Refused("leads[add][0][id]")),
    ("10 KB key", amo("k" * 10_000 + "=1"), Refused(f"longer than {MAX_KEY_LENGTH} characters")),
    ("longest key allowed", amo("k" * MAX_KEY_LENGTH + "=1"), Ok(lambda hook: hook.ignored == 1)),
    ("10 KB key in brackets, refused id", amo("leads[add][" + "k" * 10_000 + "][id]=x"), Refused("leads[add][kkkk")),
    ("1 MB value we do not read", amo("leads[add][0][id]=1", "leads[add][0][name]=" + "x" * MB), Ok(refs((ORDER, "1", NOW)))),
    ("not bytes", "account[id]=1", Refused("bytes")),
]

BITRIX24 = [
    ("REGRESSION ts=²", b24("ts=" + quote("²"), "data[FIELDS][ID]=1"), Refused("ts")),
    ("REGRESSION ts 10^40", b24("ts=1" + "0" * 40, "data[FIELDS][ID]=1"), Refused("ts")),
    ("ts of 13 digits", b24("ts=1714546800000", "data[FIELDS][ID]=1"), Refused("ts")),
    ("ts a subtree", b24("ts[x]=1", "data[FIELDS][ID]=1"), Refused("ts")),
    ("ts in 2100 passes", b24("ts=4102444800", "data[FIELDS][ID]=1"), Ok(refs((ORDER, "1", 4102444800)))),
    ("empty ts means the receipt time", b24("ts=", "data[FIELDS][ID]=1"), Ok(refs((ORDER, "1", NOW)))),
    ("REGRESSION ID of 2,000 digits", b24("ts=1", f"data[FIELDS][ID]={HUGE_ID}"), Refused("data[FIELDS][ID]")),
    ("REGRESSION ID superscript", b24("ts=1", "data[FIELDS][ID]=" + quote("²")), Refused("data[FIELDS][ID]")),
    ("ID missing", b24("ts=1"), Refused("data[FIELDS][ID]")),
    ("data a scalar", b24("ts=1", "data=x"), Refused("data[FIELDS][ID]")),
    ("ID negative", b24("ts=1", "data[FIELDS][ID]=-1"), Refused("data[FIELDS][ID]")),
    ("event lower-case", b24("ts=1", "data[FIELDS][ID]=12", event="oncrmdealadd"), Ok(refs((ORDER, "12", 1)))),
    ("unknown event, garbage data", b24(f"data[FIELDS][ID]={HUGE_ID}", event="ONCRMCOMPANYADD"),
     Ok(lambda event: event.refs == [] and event.event == "ONCRMCOMPANYADD")),
    ("event missing", b24("data[FIELDS][ID]=1", event=None), Refused("event")),
    ("event a subtree", b24("event[x]=1", "data[FIELDS][ID]=1", event=None), Refused("event")),
    ("event 10 KB", b24("data[FIELDS][ID]=1", event="E" * 10_000), Refused("event")),
    ("member_id a subtree", b24("auth[member_id][x]=1", "data[FIELDS][ID]=1"), Refused("auth[member_id]")),
    ("domain 1 KB", b24("auth[domain]=" + "d" * 1000, "data[FIELDS][ID]=1"), Refused("auth[domain]")),
    ("no auth at all", b24("ts=1", "data[FIELDS][ID]=1", token=False), Refused("auth[application_token]", credentials=True)),
    ("empty body", b"", Refused("auth[application_token]", credentials=True)),
    ("empty token", b24("auth[application_token]=", "data[FIELDS][ID]=1", token=False),
     Refused("auth[application_token]", credentials=True)),
    ("token a subtree", b24("auth[application_token][x]=1", token=False), Refused("auth[application_token]", credentials=True)),
    ("auth a scalar", b24("auth=abc", token=False), Refused("auth[application_token]", credentials=True)),
    ("no token and a bad body: authentication first", b24("ts=" + quote("²"), f"data[FIELDS][ID]={HUGE_ID}", token=False),
     Refused("auth[application_token]", credentials=True)),
    ("key 1,000 levels deep", b24(deep_key(1000) + "=1", "data[FIELDS][ID]=1"), Refused("nested deeper")),
    ("raw non-UTF-8", b24("data[FIELDS][ID]=1") + b"&x=\xff", Refused("UTF-8")),
]


@pytest.mark.parametrize("raw, expected", [pytest.param(raw, expected, id=name) for name, raw, expected in AMOCRM])
def test_amocrm_webhook(raw, expected):
    _check_parser(parse_amocrm_webhook, raw, expected)


@pytest.mark.parametrize("raw, expected", [pytest.param(raw, expected, id=name) for name, raw, expected in BITRIX24])
def test_bitrix24_event(raw, expected):
    _check_parser(parse_bitrix24_event, raw, expected)


def _check_parser(parser, raw, expected):
    if isinstance(expected, Ok):
        assert expected.check(parser(raw, received_at=NOW))
        return
    with pytest.raises(WebhookError) as info:
        parser(raw, received_at=NOW)
    message = str(info.value)
    assert expected.field in message
    assert len(message) < 300  # a 10 KB or 1,000-level key is not echoed back whole
    assert isinstance(info.value, MissingCredentials) == expected.credentials


@pytest.mark.parametrize("raw", [b"a" + b"[" * 5000, b"[" * 5000 + b"=1", b"]" * 5000 + b"=1", b"a[]" * 3000 + b"=1",
                                 b"=&" * 3000, b"%" * 10_000 + b"=1", b"\x00" * 10_000, b"a=1&" * 4999 + b"a[b]=2"])
def test_bracket_form_never_raises_anything_but_webhook_error(raw):
    try:
        tree = parse_bracket_form(raw)
    except WebhookError as exc:
        assert len(str(exc)) < 300
    else:
        assert isinstance(tree, dict)


def test_scalar_and_subtree_under_one_key():
    assert parse_bracket_form(b"a=1&a[b]=2") == {"a": {"b": "2"}}
    assert parse_bracket_form(b"a[b]=2&a=1") == {"a": {"b": "2"}}


def test_a_body_with_one_bad_item_gives_no_references():
    """All or nothing: the caller records nothing (the good first lead is not returned alone)."""
    with pytest.raises(WebhookError):
        parse_amocrm_webhook(amo("leads[add][0][id]=1", "leads[add][1][id]=2", "contacts[add][0][id]=x"))
    assert parse_amocrm_webhook(amo("leads[add][0][id]=1", "leads[add][1][id]=2"), received_at=NOW).refs == [
        EntityRef(ORDER, "1", NOW, "add"), EntityRef(ORDER, "2", NOW, "add")]


# --- integration config -------------------------------------------------------------------------------

class FakeStore:
    def __init__(self, stored: dict | None = None) -> None:
        self.items = dict(stored or {})
        self.writes = 0

    def get_integration(self, integration_id: str) -> dict | None:
        return copy.deepcopy(self.items.get(integration_id))

    def put_integration(self, integration_id: str, config: dict) -> None:
        json.dumps(config)  # what DynamoDB would be given must at least be plain data
        self.items[integration_id] = copy.deepcopy(config)
        self.writes += 1

    def integrations_on_counter(self, counter_id: int) -> list[str]:
        return sorted(i for i, config in self.items.items() if config.get("counter_id") == counter_id)

    def acquire_lease(self, scope: str, slots: int, owner: str, now: float, ttl: float) -> int | None:
        return 0  # a new integration's id prefix is decided under its counter's lease (shared_counter)

    def release_lease(self, scope: str, slot: int, owner: str) -> None:
        pass

    def expire_crm_account(self, scope: str) -> None:  # a save makes the kept amoCRM account stale
        pass


def counter_time_zone(config: dict) -> str:
    return "Europe/Moscow"


def amocrm_config(**overrides: Any) -> dict:
    config = {"crm": "amocrm", "counter_id": 4242, "metrika_token": "y0_metrika-token",
              "connection": {"base_url": "https://shop.amocrm.ru", "access_token": "amo-token",
                             "account_id": "32427762", "webhook_secret": "s" * 32}}
    config.update(overrides)
    return config


def bitrix24_config(**overrides: Any) -> dict:
    config = {"crm": "bitrix24", "counter_id": 4243, "metrika_token": "y0_metrika-token",
              "connection": {"webhook_url": "https://portal.bitrix24.ru/rest/1/abcdef0123456789/",
                             "application_token": "apptoken", "member_id": "7f3c2a9be1d04c5a8e6b0d2f4a1c9e37"}}
    config.update(overrides)
    return config


def amo_connection(**changes: Any) -> dict:
    config = amocrm_config()
    config["connection"].update(changes)
    return config


def b24_connection(**changes: Any) -> dict:
    config = bitrix24_config()
    config["connection"].update(changes)
    return config


def nested(levels: int) -> dict:
    node: dict = {}
    for _ in range(levels):
        node = {"x": node}
    return node


def stored(check: Callable[[dict], bool]) -> Ok:
    return Ok(check)


CONFIGS = [
    # the connection object
    ("REGRESSION connection a string", amocrm_config(connection="abc"), Refused("connection")),
    ("connection a list", amocrm_config(connection=[]), Refused("connection")),
    ("connection a list of pairs", amocrm_config(connection=[["base_url", "https://x.ru"]]), Refused("connection")),
    ("connection null", amocrm_config(connection=None), Refused("connection")),
    ("connection a number", amocrm_config(connection=1), Refused("connection")),
    ("connection nested 1,000 deep", amocrm_config(connection=nested(1000)), Refused("connection")),
    ("a field nested 1,000 deep", amocrm_config(x=nested(1000)), Refused("x")),
    ("connection with an unknown key", amo_connection(extra=1), Refused("connection.extra")),
    ("10 KB unknown key", amocrm_config(**{"k" * 10_000: 1}), Refused("field names are at most")),
    ("1,000 unknown keys", amocrm_config(**{f"k{i}": 1 for i in range(1000)}), Refused("more than")),
    # URLs
    ("REGRESSION 1 MB base_url", amo_connection(base_url="https://" + "a" * MB + ".ru"), Refused("connection.base_url")),
    ("base_url 2,049 characters", amo_connection(base_url="https://" + "a" * 2038 + ".ru"), Refused("connection.base_url")),
    ("base_url with user-info", amo_connection(base_url="https://user:pw@shop.amocrm.ru"), Refused("connection.base_url")),
    ("base_url javascript:", amo_connection(base_url="javascript:alert(1)"), Refused("connection.base_url")),
    ("base_url ftp://", amo_connection(base_url="ftp://shop.amocrm.ru"), Refused("connection.base_url")),
    ("base_url http:// to a public host", amo_connection(base_url="http://shop.amocrm.ru"), Refused("connection.base_url")),
    ("base_url bad IPv6", amo_connection(base_url="https://[abc"), Refused("connection.base_url")),
    ("base_url with a newline", amo_connection(base_url="https://shop.amocrm.ru\n"), Refused("connection.base_url")),
    ("base_url with a NUL", amo_connection(base_url="https://shop.amocrm.ru\x00.evil"), Refused("connection.base_url")),
    ("base_url with a query", amo_connection(base_url="https://shop.amocrm.ru/?x=1"), Refused("connection.base_url")),
    ("base_url a number", amo_connection(base_url=1), Refused("connection.base_url")),
    # without the deployment's leave (ALLOW_LOOPBACK_CRM), loopback is like any other address
    ("base_url http:// to loopback", amo_connection(base_url="http://127.0.0.1:8080"), Refused("connection.base_url")),
    ("base_url https:// to loopback", amo_connection(base_url="https://127.0.0.1:8080"), Refused("connection.base_url")),
    ("base_url localhost", amo_connection(base_url="https://localhost"), Refused("connection.base_url")),
    # IP literals in every spelling getaddrinfo reads as an address
    ("base_url a public IPv4 address", amo_connection(base_url="https://93.184.216.34"), Refused("connection.base_url")),
    ("base_url link-local metadata address", amo_connection(base_url="https://169.254.169.254"),
     Refused("connection.base_url")),
    ("base_url an IPv6 address", amo_connection(base_url="https://[2a00:1450:4001::1]"), Refused("connection.base_url")),
    ("base_url IPv4-mapped IPv6", amo_connection(base_url="https://[::ffff:10.0.0.1]"), Refused("connection.base_url")),
    ("base_url decimal address 2130706433", amo_connection(base_url="https://2130706433"), Refused("connection.base_url")),
    ("base_url short address 127.1", amo_connection(base_url="https://127.1"), Refused("connection.base_url")),
    ("base_url hex address", amo_connection(base_url="https://0x7f.0.0.1"), Refused("connection.base_url")),
    # the CRM's own domains only
    ("base_url another domain", amo_connection(base_url="https://shop.example.com"), Refused("connection.base_url")),
    ("base_url amoCRM's domain as a prefix", amo_connection(base_url="https://shop.amocrm.ru.evil.com"),
     Refused("connection.base_url")),
    ("base_url a look-alike domain", amo_connection(base_url="https://shopamocrm.ru"), Refused("connection.base_url")),
    ("base_url amoCRM's bare domain", amo_connection(base_url="https://amocrm.ru"), Refused("connection.base_url")),
    ("base_url two labels under amoCRM", amo_connection(base_url="https://a.b.amocrm.ru"), Refused("connection.base_url")),
    ("base_url with a trailing dot", amo_connection(base_url="https://shop.amocrm.ru."), Refused("connection.base_url")),
    ("base_url a Unicode host", amo_connection(base_url="https://шоп.amocrm.ru"), Refused("connection.base_url")),
    ("base_url with a path", amo_connection(base_url="https://shop.amocrm.ru/leads"), Refused("connection.base_url")),
    ("base_url custom_domain is not an amoCRM option", amo_connection(custom_domain=True),
     Refused("connection.custom_domain")),
    ("base_url Kommo", amo_connection(base_url="https://shop.kommo.com"),
     stored(lambda c: c["connection"]["base_url"] == "https://shop.kommo.com")),
    ("base_url amocrm.com", amo_connection(base_url="https://shop.amocrm.com/"),
     stored(lambda c: c["connection"]["base_url"] == "https://shop.amocrm.com/")),
    ("base_url punycode account", amo_connection(base_url="https://xn--e1afmkfd.amocrm.ru"),
     stored(lambda c: c["connection"]["base_url"] == "https://xn--e1afmkfd.amocrm.ru")),
    ("base_url upper case", amo_connection(base_url="https://SHOP.AmoCRM.ru"),
     stored(lambda c: c["connection"]["base_url"] == "https://SHOP.AmoCRM.ru")),
    ("webhook_url 1 MB", b24_connection(webhook_url="https://p.ru/rest/1/" + "a" * MB + "/"), Refused("connection.webhook_url")),
    ("webhook_url with user-info", b24_connection(webhook_url="https://u:p@portal.bitrix24.ru/rest/1/abc/"),
     Refused("connection.webhook_url")),
    ("webhook_url with a trailing newline", b24_connection(webhook_url="https://portal.bitrix24.ru/rest/1/abc/\n"),
     Refused("connection.webhook_url")),
    ("webhook_url http://", b24_connection(webhook_url="http://portal.bitrix24.ru/rest/1/abc/"), Refused("connection.webhook_url")),
    ("webhook_url a zone Bitrix24 does not serve", b24_connection(webhook_url="https://portal.bitrix24.evil/rest/1/abc/"),
     Refused("connection.webhook_url")),
    ("webhook_url on-premise without custom_domain", b24_connection(webhook_url="https://crm.example.ru/rest/1/abc/"),
     Refused("connection.webhook_url")),
    ("webhook_url an IP literal", b24_connection(webhook_url="https://10.0.0.5/rest/1/abc/"), Refused("connection.webhook_url")),
    ("webhook_url an IP literal with custom_domain", b24_connection(webhook_url="https://10.0.0.5/rest/1/abc/",
                                                                    custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url 2130706433 with custom_domain", b24_connection(webhook_url="https://2130706433/rest/1/abc/",
                                                                 custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url an internal name with custom_domain",
     b24_connection(webhook_url="https://crm.corp.internal/rest/1/abc/", custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url a .local name with custom_domain", b24_connection(webhook_url="https://crm.local/rest/1/abc/",
                                                                    custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url localhost with custom_domain", b24_connection(webhook_url="https://localhost/rest/1/abc/",
                                                                custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url a single label with custom_domain", b24_connection(webhook_url="https://bitrix/rest/1/abc/",
                                                                     custom_domain=True), Refused("connection.webhook_url")),
    ("webhook_url http:// with custom_domain", b24_connection(webhook_url="http://crm.example.ru/rest/1/abc/",
                                                              custom_domain=True), Refused("connection.webhook_url")),
    ("custom_domain \"true\"", b24_connection(webhook_url="https://crm.example.ru/rest/1/abc/", custom_domain="true"),
     Refused("connection.custom_domain")),
    ("webhook_url on-premise with custom_domain", b24_connection(webhook_url="https://crm.example.ru/rest/1/abc/",
                                                                 custom_domain=True),
     stored(lambda c: c["connection"]["custom_domain"] is True)),
    ("webhook_url bitrix24.de", b24_connection(webhook_url="https://b24-aokwy2.bitrix24.de/rest/1/abc/"),
     stored(lambda c: c["connection"]["webhook_url"].startswith("https://b24-aokwy2.bitrix24.de/"))),
    ("webhook_url bitrix24.com.br", b24_connection(webhook_url="https://loja.bitrix24.com.br/rest/1/abc/"),
     stored(lambda c: "custom_domain" not in c["connection"])),
    # tokens and ids
    ("metrika_token 1 MB", amocrm_config(metrika_token="t" * MB), Refused("metrika_token")),
    ("metrika_token with a newline", amocrm_config(metrika_token="y0_abc\r\nX-Evil: 1"), Refused("metrika_token")),
    ("metrika_token masked with nothing stored", amocrm_config(metrika_token="********"), Refused("metrika_token")),
    ("access_token 1 MB", amo_connection(access_token="t" * MB), Refused("connection.access_token")),
    ("webhook_secret 1 MB", amo_connection(webhook_secret="s" * MB), Refused("connection.webhook_secret")),
    ("application_token 1 MB", b24_connection(application_token="t" * MB), Refused("connection.application_token")),
    ("account_id Arabic-Indic digits", amo_connection(account_id="٣٤"), Refused("connection.account_id")),
    ("account_id with a newline", amo_connection(account_id="1\n"), Refused("connection.account_id")),
    ("account_id 20 digits", amo_connection(account_id="1" * 20), Refused("connection.account_id")),
    ("account_id a number", amo_connection(account_id=32427762), Refused("connection.account_id")),
    ("member_id 1 MB", b24_connection(member_id="m" * MB), Refused("connection.member_id")),
    ("member_id with a space", b24_connection(member_id="7f3c 2a9b"), Refused("connection.member_id")),
    ("domain 1 MB", b24_connection(domain="d" * MB), Refused("connection.domain")),
    ("domain kept", b24_connection(domain="acme.bitrix24.ru"), stored(lambda c: c["connection"]["domain"] == "acme.bitrix24.ru")),
    # typed fields
    ("REGRESSION hash_pii \"false\"", amocrm_config(hash_pii="false"), Refused("hash_pii")),
    ("hash_pii 0", amocrm_config(hash_pii=0), Refused("hash_pii")),
    ("hash_pii 1", amocrm_config(hash_pii=1), Refused("hash_pii")),
    ("hash_pii null", amocrm_config(hash_pii=None), Refused("hash_pii")),
    ("hash_pii false is stored as false", amocrm_config(hash_pii=False), stored(lambda c: c["hash_pii"] is False)),
    ("hash_pii true is stored as true", amocrm_config(hash_pii=True), stored(lambda c: c["hash_pii"] is True)),
    ("counter_id true", amocrm_config(counter_id=True), Refused("counter_id")),
    ("counter_id \"4242\"", amocrm_config(counter_id="4242"), Refused("counter_id")),
    ("counter_id Arabic-Indic digits", amocrm_config(counter_id="٤٢٤٢"), Refused("counter_id")),
    ("counter_id 1e40", amocrm_config(counter_id=1e40), Refused("counter_id")),
    ("counter_id 10^40", amocrm_config(counter_id=10**40), Refused("counter_id")),
    ("counter_id 4242.0", amocrm_config(counter_id=4242.0), Refused("counter_id")),
    ("counter_id negative", amocrm_config(counter_id=-1), Refused("counter_id")),
    ("counter_id 2^31", amocrm_config(counter_id=2**31), Refused("counter_id")),
    ("counter_id null", amocrm_config(counter_id=None), Refused("counter_id")),
    ("timezone Mars/Base", amocrm_config(timezone="Mars/Base"), Refused("timezone")),
    ("timezone a path", amocrm_config(timezone="../../etc/passwd"), Refused("timezone")),
    ("timezone absolute", amocrm_config(timezone="/etc/localtime"), Refused("timezone")),
    ("timezone 1 MB", amocrm_config(timezone="Europe/" + "x" * MB), Refused("timezone")),
    ("timezone with a newline", amocrm_config(timezone="UTC\n"), Refused("timezone")),
    ("timezone with a NUL", amocrm_config(timezone="UTC\x00"), Refused("timezone")),
    ("timezone a number", amocrm_config(timezone=3), Refused("timezone")),
    ("timezone kept", amocrm_config(timezone="Asia/Novosibirsk"),
     stored(lambda c: c["timezone"] == "Asia/Novosibirsk" and "timezone_source" not in c)),
    ("currency with a newline", amocrm_config(currency="RUB\n"), Refused("currency")),
    ("currency lower-case", amocrm_config(currency="rub"), Refused("currency")),
    ("currency 1 MB", amocrm_config(currency="R" * MB), Refused("currency")),
    ("client_id_field 1 MB", amocrm_config(client_id_field="f" * MB), Refused("client_id_field")),
    ("client_id_field with a control character", amocrm_config(client_id_field="_YM\x00UID"), Refused("client_id_field")),
    ("client_id_field a name with a space", amocrm_config(client_id_field="Yandex CID"),
     stored(lambda c: c["client_id_field"] == "Yandex CID")),
    ("deleted_deal_status with a newline", amocrm_config(deleted_deal_status="PAID\n"), Refused("deleted_deal_status")),
    ("deleted_deal_status 1 MB", amocrm_config(deleted_deal_status="P" * MB), Refused("deleted_deal_status")),
    ("deleted_deal_status null is kept", amocrm_config(deleted_deal_status=None), stored(lambda c: c["deleted_deal_status"] is None)),
    ("crm a list", amocrm_config(crm=["amocrm"]), Refused("crm")),
    ("crm 1 MB", amocrm_config(crm="a" * MB), Refused("crm")),
    ("nulls everywhere", {key: None for key in amocrm_config()}, Refused("crm")),
    ("nulls everywhere, every field named", {key: None for key in amocrm_config()}, Refused("counter_id")),
    ("empty object", {}, Refused("counter_id")),
    ("body a list", ["a", "list"], Refused("body")),
    ("body null", None, Refused("body")),
    ("body a string", "{}", Refused("body")),
    # accepted as sent, with validated values and defaults
    ("amoCRM config", amocrm_config(), stored(lambda c: c == {
        **amocrm_config(), "hash_pii": False, "client_id_field": "_YM_UID", "deleted_deal_status": "CANCELLED",
        "timezone": "Europe/Moscow", "timezone_source": "counter"})),
    ("Bitrix24 config", bitrix24_config(timezone="UTC"), stored(lambda c: c["connection"] == bitrix24_config()["connection"])),
]


@pytest.mark.parametrize("body, expected", [pytest.param(body, expected, id=name) for name, body, expected in CONFIGS])
def test_integration_config(body, expected):
    store = FakeStore()
    if isinstance(expected, Ok):
        save_integration(store, "shop", body, counter_time_zone)
        assert store.writes == 1 and expected.check(store.items["shop"])
        return
    with pytest.raises(ApiError) as info:
        save_integration(store, "shop", body, counter_time_zone)
    assert info.value.status == 400 and info.value.error == "invalid_request"
    assert expected.field in info.value.message or expected.field in _paths(info.value.details)
    assert len(json.dumps(info.value.body())) < 2000  # a 1 MB value or key is not echoed back
    assert store.writes == 0


def _paths(details: Any, prefix: str = "") -> set[str]:
    if not isinstance(details, dict):
        return set()
    paths = set()
    for key, value in details.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        paths |= {path} | _paths(value, path)
    return paths


@pytest.mark.parametrize("integration_id", ["", "a" * 65, "shop\n", "shop/../x", "шоп", "a b", "١٢٣", "１２３", "shop²"])
def test_integration_id(integration_id):
    with pytest.raises(ApiError) as info:
        save_integration(FakeStore(), integration_id, amocrm_config(), counter_time_zone)
    assert info.value.status == 400 and "integration id" in info.value.message


def test_masked_secrets_keep_the_stored_values_and_only_then():
    store = FakeStore()
    save_integration(store, "shop", amocrm_config(), counter_time_zone)
    masked = amocrm_config(metrika_token="********", timezone="UTC")
    masked["connection"].update(access_token="********", webhook_secret="********")
    save_integration(store, "shop", masked, counter_time_zone)
    assert store.items["shop"]["metrika_token"] == "y0_metrika-token"
    assert store.items["shop"]["connection"]["webhook_secret"] == "s" * 32
    with pytest.raises(ApiError) as info:  # another id: nothing to keep
        save_integration(store, "other", {**masked, "connection": {**masked["connection"], "webhook_secret": "t" * 16}},
                         counter_time_zone)
    assert info.value.status == 400 and {"metrika_token", "connection.access_token"} <= set(info.value.details)


@pytest.mark.parametrize("error, status, code", [
    (Misconfigured("Invalid oauth_token", source="metrika", status=403), 422, "metrika_refused"),
    (Transient("Metrika answered 503", source="metrika", status=503), 502, "metrika_unavailable"),
    (Transient("Too many requests", source="metrika", status=429), 503, "metrika_unavailable"),
])
def test_metrika_failing_to_give_the_time_zone_stores_nothing(error, status, code):
    def failing(config):
        raise error
    store = FakeStore()
    with pytest.raises(ApiError) as info:
        save_integration(store, "shop", amocrm_config(), failing)
    assert (info.value.status, info.value.error) == (status, code) and store.writes == 0


@pytest.mark.parametrize("time_zone", ["Mars/Base", "x" * MB, None])
def test_a_time_zone_from_metrika_that_is_no_zone_is_not_stored(time_zone):
    store = FakeStore()
    with pytest.raises(ApiError) as info:
        save_integration(store, "shop", amocrm_config(), lambda config: time_zone)
    assert info.value.status == 422 and "timezone" in info.value.message and len(info.value.message) < 300
    assert store.writes == 0


# --- URLs and the deployment's leave for loopback ---------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "https://127.0.0.1:8080", "http://localhost:9", "http://[::1]:8080",
                                 "http://127.5.6.7"])
def test_loopback_urls_only_where_the_deployment_allows_them(url):
    store = FakeStore()
    with pytest.raises(ApiError) as refused:
        save_integration(store, "shop", amo_connection(base_url=url), counter_time_zone)
    assert "connection.base_url" in _paths(refused.value.details) and store.writes == 0
    save_integration(store, "shop", amo_connection(base_url=url), counter_time_zone, allow_loopback=True)
    assert store.items["shop"]["connection"]["base_url"] == url


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "http://169.254.169.254", "http://shop.amocrm.ru",
                                 "http://0.0.0.0:80", "https://192.168.1.1"])
def test_the_loopback_leave_is_for_loopback_alone(url):
    with pytest.raises(ApiError) as refused:
        save_integration(FakeStore(), "shop", amo_connection(base_url=url), counter_time_zone, allow_loopback=True)
    assert "connection.base_url" in _paths(refused.value.details)


def test_an_unlisted_portal_is_told_about_custom_domain_and_the_secret_url_is_not_echoed():
    secret_url = "https://crm.example.ru/rest/1/s3cr3tc0de4242/"
    with pytest.raises(ApiError) as refused:
        save_integration(FakeStore(), "shop", b24_connection(webhook_url=secret_url), counter_time_zone)
    (message,) = refused.value.details["connection"]["webhook_url"]
    assert "connection.custom_domain" in message and "bitrix24.de" in message
    assert "s3cr3tc0de4242" not in json.dumps(refused.value.body())


# --- a stored secret stays with its endpoint ---------------------------------------------------------

def _stored(config: dict) -> FakeStore:
    store = FakeStore()
    save_integration(store, "shop", config, counter_time_zone)
    return store


def _masked(config: dict, *paths: str) -> dict:
    body = copy.deepcopy(config)
    for path in paths:
        *head, last = path.split(".")
        parent = body
        for key in head:
            parent = parent[key]
        parent[last] = "********"
    return body


def _refusal(store: FakeStore, body: dict) -> dict:
    writes = store.writes
    with pytest.raises(ApiError) as refused:
        save_integration(store, "shop", body, counter_time_zone)
    assert refused.value.status == 400 and store.writes == writes  # nothing stored, nothing half-stored
    text = json.dumps(refused.value.body())
    assert "amo-token" not in text and "apptoken" not in text and "abcdef0123456789" not in text
    return refused.value.details


@pytest.mark.parametrize("leave_out", [False, True])
def test_amocrm_token_does_not_follow_a_new_base_url(leave_out):
    store = _stored(amocrm_config())
    moved = _masked(amo_connection(base_url="https://other.kommo.com"), "connection.access_token",
                    "connection.webhook_secret")
    if leave_out:
        del moved["connection"]["access_token"], moved["connection"]["webhook_secret"]
    details = _refusal(store, moved)
    assert set(details) == {"connection.access_token", "connection.webhook_secret"}
    assert "shop.amocrm.ru → other.kommo.com" in details["connection.access_token"][0]
    assert store.items["shop"]["connection"]["base_url"] == "https://shop.amocrm.ru"


def test_a_new_base_url_with_a_new_token_but_the_old_webhook_secret_names_the_secret():
    store = _stored(amocrm_config())
    moved = _masked(amo_connection(base_url="https://other.kommo.com", access_token="new-token"), "connection.webhook_secret")
    assert set(_refusal(store, moved)) == {"connection.webhook_secret"}
    moved["connection"]["webhook_secret"] = "n" * 32
    save_integration(store, "shop", moved, counter_time_zone)
    assert store.items["shop"]["connection"] == {"base_url": "https://other.kommo.com", "access_token": "new-token",
                                                 "account_id": "32427762", "webhook_secret": "n" * 32}


def test_other_errors_are_named_together_with_the_withheld_secret():
    store = _stored(amocrm_config())
    moved = _masked(amo_connection(base_url="https://other.kommo.com", account_id="abc"), "connection.access_token")
    moved["counter_id"] = "12"
    details = _refusal(store, moved)
    assert {"counter_id", "connection.access_token"} <= set(details)
    assert "account_id" in details["connection"] and "access_token" not in details["connection"]


@pytest.mark.parametrize("same", ["https://shop.amocrm.ru/", "https://SHOP.amocrm.ru", "https://shop.amocrm.ru:443"])
def test_the_same_address_spelled_differently_keeps_the_secrets(same):
    store = _stored(amocrm_config())
    save_integration(store, "shop", _masked(amo_connection(base_url=same), "metrika_token", "connection.access_token",
                                            "connection.webhook_secret"), counter_time_zone)
    assert store.items["shop"]["connection"]["access_token"] == "amo-token"
    assert store.items["shop"]["metrika_token"] == "y0_metrika-token"


def test_bitrix24_token_does_not_follow_a_new_portal():
    store = _stored(bitrix24_config())
    moved = _masked(b24_connection(webhook_url="https://other.bitrix24.ru/rest/1/abcdef0123456789/"),
                    "connection.application_token")
    details = _refusal(store, moved)
    assert set(details) == {"connection.application_token"}
    assert "portal.bitrix24.ru → other.bitrix24.ru" in details["connection.application_token"][0]


def test_bitrix24_rotated_webhook_code_on_the_same_portal_keeps_the_token():
    store = _stored(bitrix24_config())
    rotated = _masked(b24_connection(webhook_url="https://portal.bitrix24.ru/rest/7/newcode/"), "connection.application_token")
    save_integration(store, "shop", rotated, counter_time_zone)
    assert store.items["shop"]["connection"]["application_token"] == "apptoken"
    assert store.items["shop"]["connection"]["webhook_url"] == "https://portal.bitrix24.ru/rest/7/newcode/"


@pytest.mark.parametrize("change", [{"member_id": "0123456789abcdef0123456789abcdef"}, {"domain": "other.bitrix24.ru"}])
def test_bitrix24_another_member_id_or_domain_is_another_portal(change):
    store = _stored(b24_connection(domain="portal.bitrix24.ru"))
    body = _masked(b24_connection(**{"domain": "portal.bitrix24.ru", **change}), "connection.webhook_url",
                   "connection.application_token")
    details = _refusal(store, body)
    assert set(details) == {"connection.webhook_url", "connection.application_token"}
    key = next(iter(change))
    assert f"connection.{key} changed" in details["connection.application_token"][0]


def test_bitrix24_a_member_id_added_where_none_was_stored_keeps_the_secrets():
    config = bitrix24_config()
    del config["connection"]["member_id"]
    store = _stored(config)
    body = _masked(bitrix24_config(), "connection.webhook_url", "connection.application_token")
    save_integration(store, "shop", body, counter_time_zone)
    assert store.items["shop"]["connection"]["application_token"] == "apptoken"
    assert store.items["shop"]["connection"]["member_id"] == "7f3c2a9be1d04c5a8e6b0d2f4a1c9e37"


# --- every string has a limit ------------------------------------------------------------------------

def _string_fields(schema) -> list[str]:
    from marshmallow import fields
    return [name for name, field in schema.fields.items() if isinstance(field, fields.String)]


@pytest.mark.parametrize("name", _string_fields(IntegrationConfig()))
def test_every_top_level_string_has_a_length_limit(name):
    """Fields added later are covered too: a 5,000-character value is refused and named."""
    with pytest.raises(ApiError) as refused:
        save_integration(FakeStore(), "shop", amocrm_config(**{name: "x" * 5000}), counter_time_zone)
    assert name in _paths(refused.value.details)


@pytest.mark.parametrize("crm, name", [(crm, name) for crm, schema in CONNECTION_SCHEMAS.items()
                                       for name in _string_fields(schema())])
def test_every_connection_string_has_a_length_limit(crm, name):
    config = (amo_connection if crm == "amocrm" else b24_connection)(**{name: "x" * 5000})
    with pytest.raises(ApiError) as refused:
        save_integration(FakeStore(), "shop", config, counter_time_zone)
    assert f"connection.{name}" in _paths(refused.value.details)


@pytest.mark.parametrize("crm_id", ["١٢٣", "１２３", "²", "12³", "1_000", " 12", "12\n"])
def test_replay_takes_ascii_digit_ids_only(crm_id):
    """Python's str.isdigit() and int() accept these; an entity id is 1-19 ASCII digits."""
    from chalicelib.operations import replay
    from chalicelib.store.memory import MemoryStore
    store = MemoryStore()
    with pytest.raises(ApiError) as refused:
        replay(store, lambda *args: pytest.fail("nothing may be queued"), "shop", {"kind": "order", "crm_id": crm_id})
    assert refused.value.status == 400 and "crm_id" in refused.value.details
