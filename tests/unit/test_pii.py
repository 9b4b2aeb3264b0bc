"""mask_pii: each kind is masked, and look-alikes that are not PII stay as they are."""

from __future__ import annotations

import time

import pytest

from canaryflow.dataplane.pii import luhn_ok, mask_pii


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+work@example.co.uk today", "mail me at [EMAIL] today"),
        ("a@b.io and first_last@sub.domain.org", "[EMAIL] and [EMAIL]"),
    ],
)
def test_emails_are_masked(text: str, expected: str) -> None:
    assert mask_pii(text) == expected


@pytest.mark.parametrize(
    "phone",
    [
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+49 30 12345678",
        "+33 6 12 34 56 78",
        "+4915112345678",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-555-123-4567",
        "020 7946 0958",
        "030 12345678",
        "06 12 34 56 78",
        "06.12.34.56.78",
    ],
)
def test_phone_numbers_are_masked(phone: str) -> None:
    assert mask_pii(f"call {phone} now") == "call [PHONE] now"


@pytest.mark.parametrize(
    "card",
    ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
)
def test_luhn_valid_card_numbers_are_masked(card: str) -> None:
    assert mask_pii(f"card {card}, exp 12/27") == "card [CARD], exp 12/27"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("key sk-abcdefghijklmnop1234 here", "key [SECRET] here"),
        ("sk-proj-AbCdEfGhIjKlMnOpQrStUv", "[SECRET]"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "Authorization: [SECRET]"),
        ("aws AKIAIOSFODNN7EXAMPLE ok", "aws [SECRET] ok"),
        ("token ghp_" + "a1B2c3D4e5" * 4 + " done", "token [SECRET] done"),
        ("Bearer sk-live-0123456789abcdefXYZ", "[SECRET]"),
    ],
)
def test_api_keys_and_bearer_tokens_are_masked(text: str, expected: str) -> None:
    assert mask_pii(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "released on 2024-01-15 at 10:30",
        "due 15.01.2024 or 01/15/2024 or 05-06-2024",
        "upgrade from v1.2.3 to 3.11.7 (build 2.10.4)",
        "order 4111111111111112 shipped",  # fails Luhn
        "order id 1234-5678-9012-3456",  # fails Luhn
        "pi is 3.14159265358979323846",
        "the answer is 42, in 1999 there were 8000 of them",
        "ask the desk (ext 1234)",
        "task-1234567 and sketch skip- and sk-short",
        "a Bearer of bad news",
        "",
    ],
)
def test_look_alikes_that_are_not_pii_stay(text: str) -> None:
    assert mask_pii(text) == text


def test_mixed_text_masks_every_kind_and_keeps_the_rest() -> None:
    text = (
        "Hi, I'm bob@example.com, phone +1 415 555 2671, card 4242 4242 4242 4242, "
        "order 1234567890123, key sk-abcdefghijklmnopqrstuvwx, version 2.4.1."
    )
    assert mask_pii(text) == (
        "Hi, I'm [EMAIL], phone [PHONE], card [CARD], "
        "order 1234567890123, key [SECRET], version 2.4.1."
    )


def test_masking_is_idempotent() -> None:
    once = mask_pii("x@y.com +44 20 7946 0958 4111111111111111 sk-abcdefghijklmnopqrs")
    assert mask_pii(once) == once


def test_luhn_checksum() -> None:
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")


def test_one_kilobyte_masks_in_well_under_a_millisecond() -> None:
    chunk = "The customer wrote about release 1.4.2 on 2024-03-01 and asked for a refund. "
    text = (chunk * 14)[:1000] + " bob@example.com +1 415 555 2671"
    calls = 200
    start = time.perf_counter()
    for _ in range(calls):
        mask_pii(text)
    per_call_ms = (time.perf_counter() - start) / calls * 1000
    assert per_call_ms < 1.0, f"{per_call_ms:.3f} ms per call"
