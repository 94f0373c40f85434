"""The identifier normalisers (chalicelib/normalize.py): plain functions, ValueError naming the value.

Rules: Metrika's "Hashing (md5)" page, https://yandex.ru/dev/metrika/ru/data-import/hashing, "Customer
data format" (phones: digits with the country code), https://yandex.com/dev/metrika/en/data-import/contacts-data,
the `client_ids` of "Uploading customer data (JSON)",
https://yandex.com/dev/metrika/en/management/openapi/schema/uploadContactJson_1, and `cost` in "Order data
format", https://yandex.com/dev/metrika/en/data-import/orders-data.
"""
from decimal import Decimal

import pytest

from chalicelib.normalize import (
    is_phone_region, keep_valid, mask_phone, md5_hex, normalize_client_id, normalize_email, normalize_phone,
    normalize_product_id, parse_decimal, parse_money, phone_e164, split_phones,
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
    (normalize_email, "ivan@"), (normalize_client_id, "12a"), (normalize_client_id, "00"),
    (parse_decimal, "12,5 руб"),
])
def test_errors_are_value_errors_naming_the_value(normalizer, bad):
    with pytest.raises(ValueError) as info:
        normalizer(bad)
    assert repr(bad) in str(info.value)
    assert type(info.value) is ValueError  # not marshmallow's ValidationError (which is not a ValueError)


def test_a_phone_error_names_the_value_masked_never_the_number():
    """The message can reach a parked entity's error, the status page and the log."""
    with pytest.raises(ValueError) as info:
        normalize_phone("+7 916 123-45-6")  # one digit short
    assert type(info.value) is ValueError
    assert "'+7 916 ***-*5-6'" in str(info.value) and "123" not in str(info.value)


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


# --- phones in other countries ("Customer data format": digits with the country code) ---------------

@pytest.mark.parametrize("raw, region, expected", [
    ("8 029 123-45-67", "BY", "375291234567"),     # Belarus: trunk 8, operator 029
    ("067 123 45 67", "UA", "380671234567"),       # Ukraine: trunk 0
    ("8 (7172) 12-34-56", "KZ", "77172123456"),    # Kazakhstan shares +7 with Russia
    ("8 916 123-45-67", "RU", "79161234567"),      # Russian trunk form, as before
    ("916 123-45-67", "RU", "79161234567"),        # a bare ten-digit Russian mobile, as before
    ("+7 916 123-45-67", "BY", "79161234567"),     # written with +: keeps its country whatever the region
    ("+375 29 123 45 67", "RU", "375291234567"),
    ("375291234567", "RU", "375291234567"),        # the country code without its plus
    ("79161234567", "BY", "79161234567"),
    ("8 916 123 45 67", "BY", "79161234567"),      # a Russian customer of a Belarusian shop
    ("8 10 375 29 123 45 67", "RU", "375291234567"),  # the Russian international prefix 810
    ("00 375 29 123 45 67", "UA", "375291234567"),    # the Ukrainian international prefix 00
    ("+7 916 123-45-67 доб. 12", "RU", "79161234567"),  # the extension is not part of the number
    ("+1 212 555 0100", "RU", "12125550100"),
])
def test_phones_are_read_as_written_in_the_region(raw, region, expected):
    assert normalize_phone(raw, region=region) == expected
    assert phone_e164(raw, region=region) == "+" + expected


@pytest.mark.parametrize("raw, region", [
    ("8 029 123-45-67", "RU"),   # no Russian number starts 7 0…: dropped, not sent as 70291234567
    ("067 123 45 67", "RU"),
    ("+7 916 123-45-6", "RU"),   # one digit short
    ("+8 916 123 45 67", "RU"),  # no country code 8…
    ("9" * 2000, "RU"),          # far past any number: not even parsed
    ("call after 5pm", "RU"), ("", "RU"), ("+", "RU"),
    ("8 029 123-45-67", "ZZ"),   # an unknown region reads nothing but international numbers
], ids=lambda value: repr(value)[:24])
def test_what_is_not_a_valid_number_is_refused(raw, region):
    with pytest.raises(ValueError):
        normalize_phone(raw, region=region)


def test_the_output_read_again_is_the_same_number_in_any_region():
    """Rows carry E.164 with its +: read again (the row schema does), it keeps its country. Its bare
    digits are not safe to read in a region (German numbers are long enough to take a Russian one)."""
    for region in ("RU", "BY", "UA", "DE", "US"):
        for raw, home in (("8 029 123-45-67", "BY"), ("067 123 45 67", "UA"), ("8 916 123-45-67", "RU")):
            e164 = phone_e164(raw, region=home)
            assert phone_e164(e164, region=region) == e164
    assert normalize_phone("79161234567", region="DE") == "4979161234567"  # why the + is kept


def test_hashes_are_of_the_normalised_international_number():
    assert md5_hex(normalize_phone("8 029 123-45-67", region="BY")) == md5_hex("375291234567")


def test_mask_keeps_four_leading_and_two_trailing_digits_and_the_separators():
    assert mask_phone("+7 916 123-45-67") == "+7 916 ***-**-67"
    assert mask_phone("8 029 123-45-67") == "8 029 ***-**-67"
    assert mask_phone("12345") == "*****"               # too short to show any digit
    assert mask_phone("1234567") == "1****67"  # at least four digits always hidden
    assert mask_phone("ivan@mail.ru") == "*********.**"  # letters and @ starred, dots kept
    long = mask_phone("7" * 2000)
    assert len(long) == 65 and long.endswith("…") and long.count("7") == 6


def test_split_phones_keeps_valid_numbers_once_and_masks_the_rest():
    kept, dropped = split_phones(["+7 916 123-45-67", "8 916 123 45 67", "n/a", "8 029 123-45-67", None, "  "],
                                 region="RU")
    assert kept == ["+79161234567"]
    assert dropped == ["***", "8 029 ***-**-67"]  # empty values are no phones, not wrong ones
    assert split_phones(["8 029 123-45-67"], region="BY") == (["+375291234567"], [])
    assert split_phones([], region="RU") == ([], [])


def test_phone_regions_are_upper_case_iso_codes_the_library_knows():
    assert all(map(is_phone_region, ("RU", "BY", "UA", "KZ", "GB", "US")))
    assert not any(map(is_phone_region, ("ru", "UK", "ZZ", "RUS", "", None, 7, "R")))


# --- amounts people type (an order's cost) -----------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("1 000,50", Decimal("1000.50")), ("1\u00a0000,50", Decimal("1000.50")), ("1000,5", Decimal("1000.5")),
    ("1,000.50", Decimal("1000.50")), ("1.000,50", Decimal("1000.50")), ("1,000,000", Decimal("1000000")),
    ("1500.00", Decimal("1500.00")), ("0", Decimal(0)), (1500, Decimal(1500)), (12.5, Decimal("12.5")),
    (Decimal("7.25"), Decimal("7.25")), ("1'000", Decimal(1000)),
])
def test_amounts_as_people_type_them(raw, expected):
    assert parse_money(raw) == (expected, None)


def test_a_bitrix24_money_value_carries_its_currency():
    assert parse_money("1500|RUB") == (Decimal(1500), "RUB")
    assert parse_money("1 500,5|usd") == (Decimal("1500.5"), "USD")
    assert parse_money("|RUB") == (None, None)  # an empty money field


@pytest.mark.parametrize("raw, reason", [
    ("-100", "negative"), (-1, "negative"), ("1e400", "not a number"), (float("inf"), "not a finite number"),
    (float("nan"), "not a finite number"), ("9" * 2000, "longer than 40"), (int("9" * 2000), "above 10"),
    (Decimal("1e400"), "above 10"), ("двадцать", "not a number"), ("12,5 руб", "not a number"),
    ("1,000", "ambiguous"), (True, "yes/no"), ("1500|рубли", "ISO 4217"), ("1.2.3,4,5", "not a number"),
], ids=lambda value: repr(value)[:24])
def test_what_is_not_an_amount_is_refused_with_the_reason(raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_money(raw)


def test_empty_is_no_amount():
    assert parse_money(None) == parse_money("") == parse_money("   ") == (None, None)
