"""Each documented row rule, with a passing and a failing case (Metrika's "Uploading customer data (JSON)",
"Uploading orders (JSON)", "Order status mapping", "Creating attributes", "Creating a product list",
"Date and time format" and "Hashing (md5)" pages; URLs in chalicelib/metrika/schemas.py)."""
from datetime import datetime, timedelta, timezone

import pytest
from marshmallow import ValidationError

from chalicelib.metrika.schemas import (
    Attribute, ContactRow, OrderRow, OrderStatus, Product, hash_identifiers, to_cdp_rows,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)  # 15:00 in Moscow


def order(**fields):
    row = {"id": "deal-1", "client_uniq_id": "c-1", "create_date_time": "2026-11-01 10:00:00",
           "order_status": "PAID"}
    row.update(fields)
    return row


def load_order(row, time_zone="Europe/Moscow"):
    return to_cdp_rows(OrderRow(time_zone=time_zone, now=NOW), [row])[0]


def load_contact(row, time_zone="Europe/Moscow"):
    return to_cdp_rows(ContactRow(time_zone=time_zone, now=NOW), [row])[0]


def errors_of(fn, *args):
    with pytest.raises(ValidationError) as info:
        fn(*args)
    return info.value.messages


# --- identifiers (the normalisers themselves are tested in test_normalize.py) ------------------------

def test_normalisers_stay_importable_from_schemas():
    """crm/*/source.py and older callers import them from here; they are the normalize module's own."""
    from chalicelib import normalize
    from chalicelib.metrika import schemas
    for name in ("normalize_email", "normalize_phone", "normalize_client_id", "normalize_product_id", "md5_hex",
                 "keep_valid", "parse_decimal", "MONEY_MAX"):
        assert getattr(schemas, name) is getattr(normalize, name)


def test_hash_pii_replaces_phones_and_emails_by_their_md5():
    contact = ContactRow().load({"uniq_id": "c", "emails": ["mail@yandex.ru"], "phones": ["+7 999 555 11 11"]})
    hashed = hash_identifiers(contact)
    assert "emails" not in hashed and "phones" not in hashed
    assert hashed["emails_md5"] == ["3c56ff8fef0f6c65b36b2d25720fe276"]
    assert hashed["phones_md5"] == ["f09f2c3d48f31e2a802944ade2e5aec5"]


def test_phones_from_the_translators_keep_their_country_and_are_hashed_as_digits():
    """Translators send E.164 read in the integration's region; the schema must not read it again as
    Russian (375291234567 is no Russian number, and it would be dropped or misread)."""
    row = load_contact({"uniq_id": "c", "phones": ["+375291234567", "+380671234567", "+79161234567"]})
    assert row["phones"] == ["375291234567", "380671234567", "79161234567"]
    hashed = hash_identifiers(ContactRow().load({"uniq_id": "c", "phones": ["+375291234567"]}))
    import hashlib
    assert hashed["phones_md5"] == [hashlib.md5(b"375291234567").hexdigest()]


def test_a_phone_that_is_no_number_fails_the_row_naming_it_masked():
    messages = errors_of(load_contact, {"uniq_id": "c", "phones": ["+7 916 123-45-6"]})
    assert messages[0]["phones"] == {0: ["not a valid phone number (region RU): '+7 916 ***-*5-6'"]}


def test_phone_region_validator_for_the_integration_config():
    from chalicelib.metrika.schemas import check_phone_region
    for good in ("RU", "BY", "UA", "KZ", "GB"):
        check_phone_region(good)
    for bad in ("ru", "UK", "ZZ", "RUS", ""):
        with pytest.raises(ValidationError, match="ISO 3166-1 alpha-2"):
            check_phone_region(bad)
    with pytest.raises(ValidationError, match="GB"):
        check_phone_region("UK")


# --- contacts --------------------------------------------------------------------------------------

def test_contact_row_normalises_identifiers_and_drops_empty_fields():
    row = load_contact({"uniq_id": "c-1", "name": "Иван", "emails": ["Ivan@Example.com", "ivan@example.com"],
                        "phones": ["8 (916) 123-45-67"], "client_ids": ["1714651234567890123"], "user_ids": []})
    assert row == {"uniq_id": "c-1", "name": "Иван", "emails": ["ivan@example.com"], "phones": ["79161234567"],
                   "client_ids": ["1714651234567890123"]}


def test_contact_row_requires_a_non_blank_uniq_id_and_rejects_unknown_fields():
    messages = errors_of(load_contact, {"uniq_id": "  ", "surname": "x"})
    assert messages[0]["uniq_id"] == ["must not be blank"]
    assert "surname" in messages[0]


def test_contact_errors_are_reported_per_item():
    messages = errors_of(load_contact, {"uniq_id": "c", "client_ids": ["1", "0"], "emails": ["x"]})
    assert set(messages[0]["client_ids"]) == {1}
    assert set(messages[0]["emails"]) == {0}
    # The normaliser's ValueError becomes the field's message, naming the value.
    assert messages[0]["emails"][0] == ["not an e-mail address: 'x'"]
    assert "'0'" in messages[0]["client_ids"][1][0]


def test_contact_update_time_not_before_create():
    ok = load_contact({"uniq_id": "c", "create_date_time": "2026-01-01 10:00:00", "update_date_time": "2026-01-01 10:00:00"})
    assert ok["update_date_time"] == "2026-01-01 10:00:00"
    messages = errors_of(load_contact, {"uniq_id": "c", "create_date_time": "2026-01-02 10:00:00",
                                        "update_date_time": "2026-01-01 10:00:00"})
    assert "update_date_time" in messages[0]


def test_birth_date_between_1970_and_today():
    assert load_contact({"uniq_id": "c", "birth_date": "1985-04-12"})["birth_date"] == "1985-04-12"
    assert "birth_date" in errors_of(load_contact, {"uniq_id": "c", "birth_date": "1969-12-31"})[0]


# --- orders: dates ---------------------------------------------------------------------------------

def test_aware_times_are_written_in_the_counters_time_zone():
    created = datetime(2026, 11, 1, 7, 30, 15, tzinfo=timezone.utc)
    assert load_order(order(create_date_time=created))["create_date_time"] == "2026-11-01 10:30:15"
    assert load_order(order(create_date_time=created), "UTC")["create_date_time"] == "2026-11-01 07:30:15"


def test_naive_datetimes_and_other_formats_are_refused():
    assert "create_date_time" in errors_of(load_order, order(create_date_time=datetime(2026, 11, 1)))[0]
    assert "create_date_time" in errors_of(load_order, order(create_date_time="2026-11-01T10:00:00Z"))[0]


def test_future_times_are_refused_in_the_counters_time_zone():
    # 14:59 Moscow is in the past at 12:00 UTC; 15:01 Moscow is in the future.
    assert load_order(order(create_date_time="2026-11-28 14:59:00"))
    messages = errors_of(load_order, order(create_date_time="2026-11-28 15:01:00"))
    assert "future" in messages[0]["create_date_time"][0]
    # In a UTC counter the same wall-clock time is hours ahead.
    assert "create_date_time" in errors_of(load_order, order(create_date_time="2026-11-28 14:59:00"), "UTC")[0]


def test_times_before_1970_are_refused():
    assert "create_date_time" in errors_of(load_order, order(create_date_time="1969-12-31 23:59:59"))[0]
    assert load_order(order(create_date_time="1970-01-01 00:00:00"))


def test_update_and_finish_not_before_create():
    assert load_order(order(update_date_time="2026-11-01 10:00:00", finish_date_time="2026-11-02 10:00:00"))
    messages = errors_of(load_order, order(update_date_time="2026-10-31 10:00:00",
                                           finish_date_time="2026-10-30 10:00:00"))
    assert set(messages[0]) == {"update_date_time", "finish_date_time"}


# --- orders: amounts, products, required fields ----------------------------------------------------

def test_revenue_and_cost_non_negative_numbers():
    row = load_order(order(revenue="15990.50", cost=0))
    assert row["revenue"] == 15990.5 and row["cost"] == 0
    messages = errors_of(load_order, order(revenue=-1, cost="1e16"))
    assert set(messages[0]) == {"revenue", "cost"}


def test_product_quantities_non_negative_and_keys_non_blank():
    assert load_order(order(products={"sku-1": 2, "sku-2": "1.5"}))["products"] == {"sku-1": 2, "sku-2": 1.5}
    assert "products" in errors_of(load_order, order(products={"sku-1": -1}))[0]
    assert "products" in errors_of(load_order, order(products={" ": 1}))[0]


def test_required_order_fields():
    messages = errors_of(load_order, {"id": "1"})
    assert {"client_uniq_id", "create_date_time", "order_status"} <= set(messages[0])
    assert load_order(order())["client_type"] == "CONTACT"
    assert "client_type" in errors_of(load_order, order(client_type="COMPANY"))[0]


def test_currency_is_an_iso_code():
    assert load_order(order(currency="RUB"))["currency"] == "RUB"
    assert "currency" in errors_of(load_order, order(currency="rubles"))[0]


# --- schema entries ----------------------------------------------------------------------------------

@pytest.mark.parametrize("good", ["won", "C2:WON", "in_work-2", "x" * 255])
def test_status_ids_matching_the_pattern(good):
    assert OrderStatus().load({"id": good, "type": "PAID"})["id"] == good


@pytest.mark.parametrize("bad", ["", "x" * 256, "в работе", "in work", "a.b", "a/b"])
def test_status_ids_outside_the_pattern(bad):
    assert "id" in errors_of(OrderStatus().load, {"id": bad, "type": "PAID"})


def test_status_types_and_the_cancelled_spelling():
    for status_type in ("IN_PROGRESS", "PAID", "CANCELLED", "SPAM"):
        assert OrderStatus().load({"id": "s", "type": status_type})
    assert "CANCELLED" in errors_of(OrderStatus().load, {"id": "s", "type": "CANCELED"})["type"][0]
    assert "type" in errors_of(OrderStatus().load, {"id": "s", "type": "DONE"})


def test_attribute_and_product_ids_follow_the_same_pattern():
    assert Attribute().load({"name": "loyalty_tier", "type_name": "text", "multivalued": False})
    assert "name" in errors_of(Attribute().load, {"name": "loyalty tier", "type_name": "text", "multivalued": False})
    assert "type_name" in errors_of(Attribute().load, {"name": "flag", "type_name": "boolean", "multivalued": False})
    assert Product().load({"name": "sku-123", "humanized": "Синий чайник"})
    assert "name" in errors_of(Product().load, {"name": "Синий чайник"})


def test_future_check_uses_real_now_by_default():
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
    with pytest.raises(ValidationError):
        to_cdp_rows(OrderRow(time_zone="UTC"), [order(create_date_time=tomorrow)])
