from __future__ import annotations

import pytest

from canaryflow.deliveries import SeenDeliveries, sign_payload, verify_signature
from canaryflow.errors import WebhookSignatureError


def test_valid_signature_passes() -> None:
    body = b'{"spec": {}}'
    verify_signature("s3cret", timestamp="1000", signature=sign_payload("s3cret", "1000", body),
                     body=body, now=1010)  # fmt: skip


@pytest.mark.parametrize(
    ("timestamp", "signature", "now", "message"),
    [
        ("1000", "sha256=00", 1000, "does not match"),
        ("1000", None, 1000, "missing"),
        ("soon", "sha256=00", 1000, "unix seconds"),
        ("1000", "SIG", 5000, "old"),
    ],
)
def test_bad_deliveries_are_refused(
    timestamp: str, signature: str | None, now: float, message: str
) -> None:
    body = b"{}"
    if signature == "SIG":
        signature = sign_payload("s3cret", timestamp, body)
    with pytest.raises(WebhookSignatureError, match=message):
        verify_signature("s3cret", timestamp=timestamp, signature=signature, body=body, now=now)


def test_a_changed_body_breaks_the_signature() -> None:
    signature = sign_payload("s3cret", "1000", b'{"weight": 5}')
    with pytest.raises(WebhookSignatureError):
        verify_signature(
            "s3cret", timestamp="1000", signature=signature, body=b'{"weight": 50}', now=1000
        )


def test_no_secret_refuses_everything() -> None:
    with pytest.raises(WebhookSignatureError, match="no secret"):
        verify_signature("", timestamp="1", signature="x", body=b"", now=1)


def test_seen_deliveries_forget_the_oldest() -> None:
    seen = SeenDeliveries(capacity=2)
    for i in range(3):
        seen.remember(f"d{i}", f"run{i}")
    assert seen.get("d0") is None and seen.get("d2") == "run2"
