"""amoCRM API v4 records → Metrika rows: pure translation, checked through the Metrika schemas."""
from datetime import datetime, timezone

import pytest

from chalicelib.crm.amocrm.translate import default_mapping, field_values, lead_rows, stage_key
from chalicelib.metrika.schemas import ContactRow, OrderRow, to_cdp_rows

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
MAPPING = [{"crm_status": "7001:142", "metrika_status_id": "won", "type": "PAID"},
           {"crm_status": "7001:1001", "metrika_status_id": "amo_7001_1001", "type": "IN_PROGRESS"}]
CONTACT = {"id": 37054081, "name": "Иван Петров", "created_at": 1790000000, "updated_at": 1790000100,
           "custom_fields_values": [
               {"field_id": 1, "field_code": "PHONE", "values": [{"value": "+7 (900) 123-45-67", "enum_code": "MOB"},
                                                                 {"value": "8 900 123 45 67"}, {"value": "n/a"}]},
               {"field_id": 2, "field_code": "EMAIL", "values": [{"value": "Ivan@Example.COM"}]},
               {"field_id": 3, "field_code": None, "field_name": "ClientID", "values": [{"value": "1790000000123456789"}]}]}


def lead(**fields):
    base = {"id": 32966269, "name": "Заказ #1042", "price": 15900, "status_id": 142, "pipeline_id": 7001,
            "created_at": 1790000000, "updated_at": 1790000300, "closed_at": 1790000300,
            "custom_fields_values": [{"field_id": 752013, "field_code": "_YM_UID", "field_type": "tracking_data",
                                      "values": [{"value": "1717171717123456789"}]}],
            "_embedded": {"contacts": [{"id": 1, "is_main": False}, {"id": 37054081, "is_main": True}],
                          "catalog_elements": [{"id": 525439, "metadata": {"quantity": 2, "catalog_id": 4521}},
                                               {"id": 525440, "metadata": {"quantity": 1.5, "catalog_id": 4521}}]}}
    base.update(fields)
    return base


def rows(data, **kwargs):
    options = {"mapping": MAPPING, "client_id_field": "_YM_UID", "now": NOW}
    options.update(kwargs)
    return lead_rows(data, {37054081: CONTACT, 1: {"id": 1, "name": "Other"}}, **options)


def test_won_lead_with_main_contact_products_and_client_ids():
    entity = rows(lead(), currency="RUB")
    [contact] = to_cdp_rows(ContactRow(time_zone="Europe/Moscow", now=NOW), entity.contacts)
    [order] = to_cdp_rows(OrderRow(time_zone="Europe/Moscow", now=NOW), entity.orders)
    assert contact == {"uniq_id": "37054081", "name": "Иван Петров", "create_date_time": "2026-09-21 17:13:20",
                       "update_date_time": "2026-09-21 17:15:00", "client_ids": ["1717171717123456789"],
                       "emails": ["ivan@example.com"], "phones": ["79001234567"]}
    assert order == {"id": "32966269", "client_uniq_id": "37054081", "client_type": "CONTACT",
                     "create_date_time": "2026-09-21 17:13:20", "update_date_time": "2026-09-21 17:18:20",
                     "finish_date_time": "2026-09-21 17:18:20", "order_status": "won", "revenue": 15900,
                     "currency": "RUB", "products": {"525439": 2, "525440": 1.5}}


def test_times_follow_the_counters_time_zone():
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), rows(lead()).orders)
    assert order["create_date_time"] == "2026-09-21 14:13:20"


def test_client_id_field_by_name_or_id_and_on_the_contact():
    by_name = rows(lead(custom_fields_values=None), client_id_field="clientid").contacts[0]
    assert by_name["client_ids"] == ["1790000000123456789"]
    by_id = rows(lead(), client_id_field="752013").contacts[0]
    assert by_id["client_ids"] == ["1717171717123456789"]


def test_lead_without_contact_gets_a_contact_from_the_lead():
    entity = rows(lead(_embedded={"contacts": [], "catalog_elements": []}, price=0))
    assert entity.contacts == [{"uniq_id": "lead-32966269", "name": "Заказ #1042",
                                "create_date_time": datetime(2026, 9, 21, 14, 13, 20, tzinfo=timezone.utc),
                                "client_ids": ["1717171717123456789"]}]
    assert entity.orders[0]["client_uniq_id"] == "lead-32966269"
    assert entity.orders[0]["revenue"] == 0 and "products" not in entity.orders[0]


def test_unmapped_stage_is_held_with_an_explanation():
    pipelines = {7001: {"id": 7001, "name": "Продажи", "_embedded": {"statuses": [{"id": 1002, "name": "Переговоры"}]}}}
    entity = rows(lead(status_id=1002), pipelines=pipelines)
    assert entity.orders == [] and entity.error["code"] == "unmapped_stage"
    assert entity.error["crm_status"] == "7001:1002"
    assert "Продажи: Переговоры" in entity.error["message"]


def test_won_in_another_pipeline_is_a_different_stage():
    assert rows(lead(pipeline_id=7002)).error["crm_status"] == "7002:142"


def test_future_times_are_clamped_to_now():
    entity = rows(lead(updated_at=int(NOW.timestamp()) + 120, closed_at=None))
    assert entity.orders[0]["update_date_time"] == NOW and "finish_date_time" not in entity.orders[0]


def test_invalid_client_ids_are_dropped_not_fatal():
    data = lead(custom_fields_values=[{"field_code": "_YM_UID", "values": [{"value": "GA1.2.3.4"}, {"value": "0"}]}])
    contact = rows(data).contacts[0]
    assert contact["uniq_id"] == "37054081" and "client_ids" not in contact


def test_field_values_reads_ids_codes_and_names():
    fields = CONTACT["custom_fields_values"]
    assert field_values(fields, "phone") == ["+7 (900) 123-45-67", "8 900 123 45 67", "n/a"]
    assert field_values(fields, "3") == ["1790000000123456789"]
    assert field_values(None, "PHONE") == []


def test_default_mapping_from_pipelines():
    pipelines = [{"id": 7001, "name": "Продажи", "_embedded": {"statuses": [
                     {"id": 70010, "name": "Неразобранное", "type": 1}, {"id": 1001, "name": "Первичный контакт"},
                     {"id": 142, "name": "Успешно реализовано"}, {"id": 143, "name": "Закрыто и не реализовано"}]}},
                 {"id": 7002, "name": "Опт", "_embedded": {"statuses": [
                     {"id": 142, "name": "Оплачено"}, {"id": 143, "name": "Отказ"}]}}]
    entries = {e["crm_status"]: e for e in default_mapping(pipelines)}
    assert entries[stage_key(7001, 142)] == {"crm_status": "7001:142", "metrika_status_id": "won",
                                             "humanized": "Успешно реализовано", "type": "PAID"}
    assert entries["7002:142"]["metrika_status_id"] == "won" and entries["7002:142"]["humanized"] == "Успешно реализовано"
    assert entries["7002:143"]["type"] == "CANCELLED"
    assert entries["7001:70010"] == {"crm_status": "7001:70010", "metrika_status_id": "amo_7001_70010",
                                     "humanized": "Продажи: Неразобранное", "type": "IN_PROGRESS"}
    from chalicelib.status_mapping import StatusMapping
    assert StatusMapping().load({"entries": list(entries.values())})  # valid as proposed


# --- phones read in the integration's region; the account's currency; the cost field ----------------

BY_CONTACT = {"id": 501, "name": "Алесь", "created_at": 1790000000, "updated_at": 1790000100,
              "custom_fields_values": [{"field_id": 1, "field_code": "PHONE", "values": [
                  {"value": "8 029 123-45-67"}, {"value": "+7 916 123-45-67"}, {"value": "8 (029) 12"}]}]}


def by_lead(**fields):
    return lead(_embedded={"contacts": [{"id": 501, "is_main": True}], "catalog_elements": []}, **fields)


def test_phones_are_read_in_the_region_and_the_unreadable_one_is_noted_masked():
    entity = lead_rows(by_lead(), {501: BY_CONTACT}, mapping=MAPPING, client_id_field="_YM_UID", now=NOW,
                       currency="USD", phone_region="BY")
    assert entity.contacts[0]["phones"] == ["+375291234567", "+79161234567"]
    assert entity.notes == {"phones_dropped": {"501": 1}, "phone_examples": {"501": "* (***) 12"}}
    [contact] = to_cdp_rows(ContactRow(time_zone="UTC", now=NOW), entity.contacts)
    assert contact["phones"] == ["375291234567", "79161234567"]  # digits with the country code
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert order["currency"] == "USD"


def test_the_same_contact_read_as_russian_drops_the_belarusian_number_instead_of_misreading_it():
    entity = lead_rows(by_lead(), {501: BY_CONTACT}, mapping=MAPPING, client_id_field="_YM_UID", now=NOW)
    assert entity.contacts[0]["phones"] == ["+79161234567"]  # not 70291234567
    assert entity.notes["phones_dropped"] == {"501": 2}
    assert entity.notes["phone_examples"] == {"501": "8 029 ***-**-67"}


def test_a_contact_without_dropped_phones_still_notes_zero_so_a_correction_clears_the_count():
    assert rows(lead()).notes == {"phones_dropped": {"37054081": 1}, "phone_examples": {"37054081": "***"}}
    clean = {**CONTACT, "custom_fields_values": CONTACT["custom_fields_values"][1:]}
    entity = lead_rows(lead(), {37054081: clean}, mapping=MAPPING, client_id_field="_YM_UID", now=NOW)
    assert entity.notes == {"phones_dropped": {"37054081": 0}}


def test_a_contact_on_its_own_carries_its_notes():
    from chalicelib.crm.amocrm.translate import contact_entity
    entity = contact_entity(BY_CONTACT, "_YM_UID", NOW, phone_region="BY")
    assert [c["phones"] for c in entity.contacts] == [["+375291234567", "+79161234567"]]
    assert entity.notes == {"phones_dropped": {"501": 1}, "phone_examples": {"501": "* (***) 12"}}


def cost_lead(*values, field_id=880011, code="COST", name="Себестоимость"):
    return lead(custom_fields_values=[{"field_id": field_id, "field_code": code, "field_name": name,
                                       "values": [{"value": v} for v in values]}])


@pytest.mark.parametrize("field", ["880011", "cost", "себестоимость"])
def test_cost_field_by_id_code_or_name_becomes_the_orders_cost(field):
    entity = rows(cost_lead("11 000,50"), cost_field=field, currency="RUB")
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert order["cost"] == 11000.5 and order["revenue"] == 15900
    assert "cost_dropped" not in entity.notes


@pytest.mark.parametrize("value, reason", [
    ("-100", "negative"), ("1e400", "not a number"), ("9" * 2000, "longer than 40 characters"),
    ("около тысячи", "not a number"), ("1,000", "ambiguous: a thousands comma or a decimal comma?"),
    ("1500|EUR", "in EUR, the order is in RUB"),
], ids=lambda value: str(value)[:16])
def test_a_cost_that_is_not_an_amount_is_left_out_and_the_order_still_goes(value, reason):
    entity = rows(cost_lead(value), cost_field="COST", currency="RUB")
    assert entity.error is None
    [order] = to_cdp_rows(OrderRow(time_zone="UTC", now=NOW), entity.orders)
    assert "cost" not in order and order["order_status"] == "won" and order["revenue"] == 15900
    assert entity.notes["cost_dropped"] == {"value": str(value)[:40], "reason": reason}


def test_several_values_in_the_cost_field_are_not_guessed_between():
    entity = rows(cost_lead("100", "200"), cost_field="COST")
    assert "cost" not in entity.orders[0]
    assert entity.notes["cost_dropped"] == {"value": "100, 200", "reason": "the field holds several values"}


def test_no_cost_field_or_an_empty_one_sends_no_cost_and_notes_nothing():
    assert "cost" not in rows(cost_lead("500")).orders[0]  # not configured
    entity = rows(lead(), cost_field="COST")  # configured, absent from the lead
    assert "cost" not in entity.orders[0] and "cost_dropped" not in entity.notes
    assert rows(cost_lead(0), cost_field="COST").orders[0]["cost"] == 0  # zero is a cost
