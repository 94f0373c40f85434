"""amoCRM webhook parsing, each case with a realistic body: the form format and events of amoCRM "Формат
webhooks" (https://www.amocrm.ru/developers/content/crm_platform/webhooks-format), and shapes seen in real
captures but not in the vendor docs (observed): `linked_leads_id` keyed by lead id, a bare `values[0]`."""
from pathlib import Path
from urllib.parse import urlencode

import pytest

from chalicelib.crm import CONTACT, ORDER, EntityRef, WebhookError
from chalicelib.crm.amocrm.webhook import parse_amocrm_webhook
from chalicelib.crm.form import parse_bracket_form

FIXTURES = Path(__file__).parent / "fixtures" / "amocrm"
ACCOUNT = [("account[subdomain]", "example"), ("account[id]", "32427762"),
           ("account[_links][self]", "https://example.amocrm.ru")]


def body(*pairs):
    return urlencode([*ACCOUNT, *pairs]).encode()


def fixture(name):
    return (FIXTURES / f"{name}.txt").read_bytes().strip()


def test_status_lead_capture():
    hook = parse_amocrm_webhook(fixture("status_lead"))
    assert hook.account_id == "32427762"
    assert hook.refs == [EntityRef(ORDER, "32966269", 1748270000, "status")]


def test_add_lead_capture_with_tracking_fields():
    assert parse_amocrm_webhook(fixture("add_lead")).refs == [EntityRef(ORDER, "32966269", 1748268669, "add")]


def test_add_contact_capture_with_linked_leads_keyed_by_lead_id():
    refs = parse_amocrm_webhook(fixture("add_contact")).refs
    assert refs == [EntityRef(CONTACT, "37054081", 1748268670, "add"),
                    EntityRef(ORDER, "32966269", 1748268670, "contact_add")]


def test_form_is_decoded_exactly_once_plus_cyrillic_and_keyed_lists():
    tree = parse_bracket_form(fixture("add_contact"))
    contact = tree["contacts"]["add"]["0"]
    assert contact["custom_fields"]["0"]["values"]["0"]["value"] == "+79001234567"  # %2B stays a plus
    assert contact["name"] == "Иван Петров"  # `+` in the form means a space, decoded once
    assert contact["linked_leads_id"] == {"32966269": {"ID": "32966269"}}
    assert tree["account"]["_links"]["self"] == "https://example.amocrm.ru"


def test_digital_pipeline_short_form_without_times():
    hook = parse_amocrm_webhook(fixture("dp_status"), received_at=1790000000)
    assert hook.account_id == "29085955"
    assert hook.refs == [EntityRef(ORDER, "2050297", 1790000000, "status")]


def test_update_and_status_for_one_stage_change_both_refer_to_the_lead():
    hook = parse_amocrm_webhook(body(("leads[update][0][id]", "5"), ("leads[update][0][old_status_id]", "1001"),
                                     ("leads[update][0][status_id]", "142"), ("leads[update][0][updated_at]", "1790000010"),
                                     ("leads[status][0][id]", "5"), ("leads[status][0][status_id]", "142"),
                                     ("leads[status][0][updated_at]", "1790000010")))
    assert [(r.crm_id, r.action, r.event_time) for r in hook.refs] == [("5", "update", 1790000010),
                                                                       ("5", "status", 1790000010)]


def test_every_entity_action_and_index_is_read():
    hook = parse_amocrm_webhook(body(
        ("leads[add][0][id]", "1"), ("leads[add][1][id]", "2"), ("leads[add][2][id]", "3"),
        ("leads[restore][0][id]", "4"), ("leads[responsible][0][id]", "5"),
        ("leads[delete][0][id]", "6"), ("contacts[update][0][id]", "70"), ("contacts[update][1][id]", "71"),
        ("unsorted[add][0][uid]", "abc"), ("unsorted[add][0][lead_id]", "8")), received_at=1790000000)
    assert sorted((r.kind, r.crm_id, r.action) for r in hook.refs) == [
        (CONTACT, "70", "update"), (CONTACT, "71", "update"), (ORDER, "1", "add"), (ORDER, "2", "add"),
        (ORDER, "3", "add"), (ORDER, "4", "restore"), (ORDER, "5", "responsible"), (ORDER, "6", "delete"),
        (ORDER, "8", "unsorted")]


def test_delete_carries_only_an_id_and_gets_the_receipt_time():
    hook = parse_amocrm_webhook(body(("leads[delete][0][id]", "6"), ("leads[delete][0][status_id]", "1001"),
                                     ("leads[delete][0][pipeline_id]", "7001")), received_at=1790000500)
    assert hook.refs == [EntityRef(ORDER, "6", 1790000500, "delete")]


def test_date_fields_with_a_bare_value_and_missing_price_do_not_matter():
    hook = parse_amocrm_webhook(body(("leads[update][0][id]", "5"), ("leads[update][0][last_modified]", "1790000000"),
                                     ("leads[update][0][custom_fields][0][id]", "99"),
                                     ("leads[update][0][custom_fields][0][values][0]", "1542067200"),
                                     ("leads[update][0][custom_fields][1][id]", "98"),
                                     ("leads[update][0][custom_fields][1][values][0][value]", "x")))
    assert hook.refs == [EntityRef(ORDER, "5", 1790000000, "update")]


def test_unknown_event_kinds_are_counted_not_failed():
    hook = parse_amocrm_webhook(body(("task[add][0][id]", "1"), ("leads[note][0][note][id]", "5"),
                                     ("contacts[delete][0][id]", "7"), ("contacts[add][0][id]", "9"),
                                     ("contacts[add][0][type]", "company"), ("message[add][0][id]", "m")))
    assert hook.refs == [] and hook.ignored == 5


@pytest.mark.parametrize("raw, words", [
    (urlencode([("leads[add][0][id]", "1")]).encode(), "account"),
    (body(("leads[add][0][id]", "x1")), "numeric id"),
    (body(("leads[add][0][name]", "no id")), "numeric id"),
    (b"\xff", "UTF-8"),
])
def test_malformed_bodies(raw, words):
    with pytest.raises(WebhookError, match=words):
        parse_amocrm_webhook(raw)


def test_key_count_is_capped_before_parsing():
    from chalicelib.crm.form import MAX_KEYS
    flood = "&".join(f"k{i}=v" for i in range(MAX_KEYS + 1)).encode()
    with pytest.raises(WebhookError, match=f"{MAX_KEYS + 1} form fields; the limit is {MAX_KEYS}"):
        parse_bracket_form(flood)
