"""CI webhook authentication: HMAC-SHA256 over timestamp, delivery id and body, in constant time.

A delivery carries `X-Canaryflow-Timestamp` (unix seconds), `X-Canaryflow-Delivery` (a unique
id) and `X-Canaryflow-Signature: sha256=<hex of HMAC(secret, timestamp + "." + delivery + "." +
body)>`. Signing the timestamp bounds replays to the tolerance window; signing the delivery id
(Prefect's idempotency key) stops the same body being sent again under a new id to start a second
release; `ReplayMemory` remembers accepted signatures across restarts, so a replay inside the
window gets the run it already started, never a new one.

Nothing here echoes a submitted value back: refusals name the rule that was broken.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from canaryflow.errors import ConfigError, WebhookSignatureError

TOLERANCE_S = 300.0
WEBHOOK_PATH = "/hooks/release"
WEBHOOK_SECRET_ENV = "CANARYFLOW_WEBHOOK_SECRET"
WEBHOOK_SECRET_FILE = "webhook.secret"
REPLAY_FILE = "deliveries.sqlite"

# Unix seconds as digits with an optional fraction: no sign, exponent, nan or inf, and before
# 2100-01-01 (anything later is a broken clock or a forged header, not a delivery).
_TIMESTAMP = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
MAX_TIMESTAMP = 4_102_444_800.0
# No dot: the signed message joins the parts with dots, so the id cannot shift into the body.
DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
DELIVERY_ID_RULE = "X-Canaryflow-Delivery must be 1 to 128 letters, digits, '-' or '_'"


def valid_delivery_id(delivery: str | None) -> bool:
    return delivery is not None and DELIVERY_ID.fullmatch(delivery) is not None


def sign_payload(secret: str, timestamp: str, delivery: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + delivery.encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def parse_timestamp(timestamp: str) -> float:
    """Finite, non-negative unix seconds before 2100; the refusal names the rule, not the value."""
    if _TIMESTAMP.fullmatch(timestamp) is None:
        raise WebhookSignatureError(
            "X-Canaryflow-Timestamp must be unix seconds: plain digits with an optional "
            "fraction, a finite number from 0 (no sign, no exponent)"
        )
    sent = float(timestamp)
    if not math.isfinite(sent) or not 0.0 <= sent <= MAX_TIMESTAMP:
        raise WebhookSignatureError(
            "X-Canaryflow-Timestamp is not plausible unix seconds (0 to 4102444800): "
            "sign with the current time"
        )
    return sent


def verify_signature(
    secret: str,
    *,
    timestamp: str | None,
    delivery: str | None,
    signature: str | None,
    body: bytes,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> float:
    """Raise `WebhookSignatureError` unless the delivery is fresh and signed with `secret`;
    return its timestamp (unix seconds)."""
    if not secret:
        raise WebhookSignatureError("the webhook has no secret configured: refusing everything")
    if not timestamp or not signature:
        raise WebhookSignatureError(
            "missing X-Canaryflow-Timestamp or X-Canaryflow-Signature header: sign the delivery"
        )
    if delivery is None or not valid_delivery_id(delivery):
        raise WebhookSignatureError(f"{DELIVERY_ID_RULE}; it is part of the signed message")
    sent = parse_timestamp(timestamp)
    current = now if now is not None else time.time()
    skew = abs(current - sent)
    if skew > tolerance_s:
        when = "old" if sent <= current else "in the future"
        raise WebhookSignatureError(
            f"delivery is {skew:.0f} s {when} (tolerance {tolerance_s:.0f} s): a replay, or a "
            "clock off; sign it again with the current time"
        )
    expected = sign_payload(secret, timestamp, delivery, body)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise WebhookSignatureError(
            "signature does not match the body: check the shared secret (the HMAC covers "
            "timestamp.delivery.body)"
        )
    return sent


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


def _owner_only_file(path: Path) -> None:
    """Create `path` readable by its owner only (never through a symlink), or tighten it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class ReplayMemory:
    """Signatures of accepted deliveries and the run each started, for twice the tolerance.

    In an owner-only SQLite file under the receiver's state folder, so a restarted receiver still
    knows what it accepted: a replay (same signature, so same timestamp, id and body) inside the
    window is answered with the run it started, idempotently, and never reaches Prefect. `path`
    None keeps the memory in this process only (tests, embedding).
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        tolerance_s: float = TOLERANCE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.keep_s = 2 * tolerance_s
        self._clock = clock
        self._lock = threading.Lock()
        try:
            if path is not None:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                _owner_only_file(path)
            self._db = sqlite3.connect(
                ":memory:" if path is None else str(path),
                check_same_thread=False,
                isolation_level=None,  # autocommit: an accepted delivery is on disk at once
                timeout=5.0,
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS accepted (signature TEXT PRIMARY KEY, "
                "timestamp REAL NOT NULL, delivery TEXT NOT NULL, flow_run_id TEXT NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the webhook's replay memory {path}: {exc}") from exc

    @classmethod
    def in_folder(cls, state_dir: Path, *, tolerance_s: float = TOLERANCE_S) -> ReplayMemory:
        return cls(state_dir / REPLAY_FILE, tolerance_s=tolerance_s)

    def _prune(self) -> None:
        self._db.execute("DELETE FROM accepted WHERE timestamp < ?", (self._clock() - self.keep_s,))

    def answered(self, signature: str) -> str | None:
        """The run a delivery with this signature started, if it was accepted in the window."""
        with self._lock:
            self._prune()
            row = self._db.execute(
                "SELECT flow_run_id FROM accepted WHERE signature = ?", (signature,)
            ).fetchone()
        return None if row is None else str(row[0])

    def remember(self, *, signature: str, timestamp: float, delivery: str, run_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO accepted VALUES (?, ?, ?, ?)",
                (signature, timestamp, delivery, run_id),
            )
            self._prune()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()
