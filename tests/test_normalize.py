"""The identifier normalisers (chalicelib/normalize.py): plain functions, ValueError naming the value.

Rules: Metrika's "Hashing (md5)" page, https://yandex.ru/dev/metrika/ru/data-import/hashing, and the
`client_ids` of "Uploading customer data (JSON)",
https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContactJson_1.
"""
from decimal import Decimal

import pytest

from chalicelib.normalize import (
    keep_valid, md5_hex, normalize_client_id, normalize_email, normalize_phone, normalize_product_id, parse_decimal,
)


# --- md5 and normalisation ---------------------------------------------------------------------------

def test_md5_matches_the_documented_self_check_values():
    assert md5_hex(normalize_email("mail@yandex.ru")) == "3c56ff8fef0f6c65b36b2d25720fe276"
    assert md5_hex(normalize_phone("79995551111")) == "f09f2c3d48f31e2a802944ade2e5aec5"
    # The doc's "wrong" inputs normalise to the right hash instead of the wrong one.
    assert md5_hex(normalize_phone("+79995551111")) == "f09f2c3d48f31e2a802944ade2e5aec5" != "ad213a35b7742698d9b368b16bed84b4"
    assert md5_hex(normalize_phone("89995551111")) == "f09f2c3d48f31e2a802944ade2e5aec5" != "e9b613a41bf8d0a30fef9b3ac1dee190"


@pytest.mark.parametrize("raw", ["+7 (999) 555-11-11", "8 999 555 11 11", "9995551111", "79995551111"])
def test_phones_become_digits_with_country_code(raw):
    assert normalize_phone(raw) == "79995551111"


@pytest.mark.parametrize("raw", ["123", "phone", "+1234567890123456"])
def test_phones_without_a_plausible_number_are_rejected(raw):
    with pytest.raises(ValueError):
        normalize_phone(raw)


def test_emails_are_lower_cased_and_need_a_domain():
    assert normalize_email("  Ivan.P@Example.COM ") == "ivan.p@example.com"
    for bad in ("ivan", "ivan@", "ivan@localhost", "a b@example.com"):
        with pytest.raises(ValueError):
            normalize_email(bad)


def test_client_ids_are_digit_strings_non_zero_and_64_bit():
    assert normalize_client_id("1714651234567890123") == "1714651234567890123"
    assert normalize_client_id(17146512345) == "17146512345"
    assert normalize_client_id(str(2**64 - 1)) == str(2**64 - 1)
    for bad in ("0", "00", "12a", "-5", "1.5", str(2**64), "１２３"):
        with pytest.raises(ValueError):
            normalize_client_id(bad)


# --- the errors: plain ValueError, naming the value -------------------------------------------------

@pytest.mark.parametrize("normalizer, bad", [
    (normalize_phone, "n/a"), (normalize_email, "ivan@"), (normalize_client_id, "12a"), (normalize_client_id, "00"),
    (parse_decimal, "12,5 руб"),
])
def test_errors_are_value_errors_naming_the_value(normalizer, bad):
    with pytest.raises(ValueError) as info:
        normalizer(bad)
    assert repr(bad) in str(info.value)
    assert type(info.value) is ValueError  # not marshmallow's ValidationError (which is not a ValueError)


# --- keep_valid, product ids, amounts ----------------------------------------------------------------

def test_keep_valid_drops_what_does_not_normalise_and_repeats_in_order():
    assert keep_valid(["+7 (900) 123-45-67", "8 900 123 45 67", "n/a", "79001112233"], normalize_phone) == [
        "79001234567", "79001112233"]
    assert keep_valid([], normalize_email) == []
    assert keep_valid(iter(["0", "17", "017"]), normalize_client_id) == ["17"]


def test_keep_valid_lets_other_errors_through():
    def broken(value):
        raise KeyError(value)
    with pytest.raises(KeyError):
        keep_valid(["x"], broken)


def test_product_ids_fit_the_product_list_pattern():
    assert normalize_product_id(525439) == "525439"
    assert normalize_product_id("C2:WON-x_1") == "C2:WON-x_1"
    assert normalize_product_id("SKU 12/ä.b") == "SKU_12___b"
    assert normalize_product_id(" ") == "_" and len(normalize_product_id("x" * 300)) == 255


def test_amounts_parse_exactly_and_empty_is_absent():
    assert parse_decimal("15990.00") == Decimal("15990.00")
    assert parse_decimal(2) == Decimal(2) and parse_decimal(1.5) == Decimal("1.5")
    assert parse_decimal(None) is None and parse_decimal("") is None
