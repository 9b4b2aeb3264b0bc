"""CI webhook authentication: HMAC-SHA256 over timestamp and body, checked in constant time.

A delivery carries `X-Canaryflow-Timestamp` (unix seconds), `X-Canaryflow-Delivery` (a unique
id) and `X-Canaryflow-Signature: sha256=<hex of HMAC(secret, timestamp + "." + body)>`. Signing
the timestamp with the body bounds replays to the tolerance window; the delivery id makes a
retried delivery start one release, not two.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict

from canaryflow.errors import WebhookSignatureError

TOLERANCE_S = 300.0
WEBHOOK_PATH = "/hooks/release"
WEBHOOK_SECRET_ENV = "CANARYFLOW_WEBHOOK_SECRET"
WEBHOOK_SECRET_FILE = "webhook.secret"


def sign_payload(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def verify_signature(
    secret: str,
    *,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    if not secret:
        raise WebhookSignatureError("the webhook has no secret configured: refusing everything")
    if not timestamp or not signature:
        raise WebhookSignatureError(
            "missing X-Canaryflow-Timestamp or X-Canaryflow-Signature header: sign the delivery"
        )
    try:
        sent = float(timestamp)
    except ValueError as exc:
        raise WebhookSignatureError(
            f"X-Canaryflow-Timestamp {timestamp!r} is not unix seconds"
        ) from exc
    skew = abs((now if now is not None else time.time()) - sent)
    if skew > tolerance_s:
        raise WebhookSignatureError(
            f"delivery is {skew:.0f} s old (tolerance {tolerance_s:.0f} s): a replay, or a clock "
            "off; sign it again with the current time"
        )
    expected = sign_payload(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise WebhookSignatureError("signature does not match the body: check the shared secret")


class SeenDeliveries:
    """Delivery ids answered recently, with their result: a replayed id gets the same answer."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, delivery: str) -> str | None:
        with self._lock:
            return self._seen.get(delivery)

    def remember(self, delivery: str, result: str) -> None:
        with self._lock:
            self._seen[delivery] = result
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
