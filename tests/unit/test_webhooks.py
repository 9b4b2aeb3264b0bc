from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from canaryflow.deliveries import (
    REPLAY_FILE,
    ReplayMemory,
    SeenDeliveries,
    sign_payload,
    verify_signature,
)
from canaryflow.errors import PolicyError, SpecError, WebhookSignatureError
from canaryflow.loading import find_policy, spec_from_data

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "deployments" / "policies"


def test_valid_signature_passes_and_returns_the_timestamp() -> None:
    body = b'{"spec": {}}'
    signature = sign_payload("s3cret", "1000", "d-1", body)
    sent = verify_signature("s3cret", timestamp="1000", delivery="d-1", signature=signature,
                            body=body, now=1010)  # fmt: skip
    assert sent == 1000.0


@pytest.mark.parametrize(
    ("timestamp", "signature", "now", "message"),
    [
        ("1000", "sha256=00", 1000, "does not match"),
        ("1000", None, 1000, "missing"),
        ("soon", "sha256=00", 1000, "unix seconds"),
        ("1000", "SIG", 5000, "old"),
        ("1000", "SIG", 1, "in the future"),
    ],
)
def test_bad_deliveries_are_refused(
    timestamp: str, signature: str | None, now: float, message: str
) -> None:
    body = b"{}"
    if signature == "SIG":
        signature = sign_payload("s3cret", timestamp, "d-1", body)
    with pytest.raises(WebhookSignatureError, match=message):
        verify_signature("s3cret", timestamp=timestamp, delivery="d-1", signature=signature,
                         body=body, now=now)  # fmt: skip


def test_the_signature_covers_the_delivery_id() -> None:
    """The same body under a new id (Prefect's idempotency key) would start a second release."""
    body = b'{"spec": {}}'
    signature = sign_payload("s3cret", "1000", "d-1", body)
    assert signature != sign_payload("s3cret", "1000", "d-2", body)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_signature("s3cret", timestamp="1000", delivery="d-2", signature=signature,
                         body=body, now=1000)  # fmt: skip


@pytest.mark.parametrize("delivery", [None, "", "a.b", "d 1", "x" * 129, "d-1\n", "é"])
def test_a_missing_or_malformed_delivery_id_is_refused(delivery: str | None) -> None:
    with pytest.raises(WebhookSignatureError, match="X-Canaryflow-Delivery must be") as error:
        verify_signature("s3cret", timestamp="1000", delivery=delivery, signature="sha256=00",
                         body=b"{}", now=1000)  # fmt: skip
    if delivery:
        assert delivery not in str(error.value)


@pytest.mark.parametrize(
    "timestamp",
    ["nan", "NaN", "inf", "-inf", "Infinity", "-1000", "+1000", "1e3", "1e309", " 1000",
     "1000 ", "0x3e8", "1_000", "١٠٠٠", "99999999999", "999999999999.5", "1000.", ".5"],
)  # fmt: skip
def test_timestamps_must_be_finite_unix_seconds_in_range(timestamp: str) -> None:
    """nan compared with anything is False, so a skew check alone would let `nan` through."""
    body = b"{}"
    signature = sign_payload("s3cret", timestamp, "d-1", body)  # even correctly signed
    with pytest.raises(WebhookSignatureError, match="unix seconds") as error:
        verify_signature("s3cret", timestamp=timestamp, delivery="d-1", signature=signature,
                         body=body, now=1000)  # fmt: skip
    assert str(error.value) in RULES  # the rule, whatever was sent: nothing of it echoed


RULES = {
    "X-Canaryflow-Timestamp must be unix seconds: plain digits with an optional fraction, a "
    "finite number from 0 (no sign, no exponent)",
    "X-Canaryflow-Timestamp is not plausible unix seconds (0 to 4102444800): sign with the "
    "current time",
}


def test_a_fractional_timestamp_is_fine() -> None:
    signature = sign_payload("s3cret", "1000.25", "d-1", b"{}")
    assert verify_signature("s3cret", timestamp="1000.25", delivery="d-1", signature=signature,
                            body=b"{}", now=1000) == 1000.25  # fmt: skip


def test_a_changed_body_breaks_the_signature() -> None:
    signature = sign_payload("s3cret", "1000", "d-1", b'{"weight": 5}')
    with pytest.raises(WebhookSignatureError):
        verify_signature("s3cret", timestamp="1000", delivery="d-1", signature=signature,
                         body=b'{"weight": 50}', now=1000)  # fmt: skip


def test_no_secret_refuses_everything() -> None:
    with pytest.raises(WebhookSignatureError, match="no secret"):
        verify_signature("", timestamp="1", delivery="d", signature="x", body=b"", now=1)


def test_seen_deliveries_forget_the_oldest() -> None:
    seen = SeenDeliveries(capacity=2)
    for i in range(3):
        seen.remember(f"d{i}", f"run{i}")
    assert seen.get("d0") is None and seen.get("d2") == "run2"


def test_replay_memory_is_owner_only_survives_a_reopen_and_forgets_after_twice_the_tolerance(
    tmp_path: Path,
) -> None:
    now = [10_000.0]
    state = tmp_path / "state"
    memory = ReplayMemory(state / REPLAY_FILE, tolerance_s=300, clock=lambda: now[0])
    memory.remember(signature="sha256=aa", timestamp=10_000.0, delivery="d-1", run_id="run-1")
    memory.close()
    assert stat.S_IMODE((state / REPLAY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    reopened = ReplayMemory(state / REPLAY_FILE, tolerance_s=300, clock=lambda: now[0])
    assert reopened.answered("sha256=aa") == "run-1"
    assert reopened.answered("sha256=bb") is None
    now[0] = 10_000.0 + 600  # exactly 2x tolerance: still kept
    assert reopened.answered("sha256=aa") == "run-1"
    now[0] = 10_000.0 + 601
    assert reopened.answered("sha256=aa") is None and len(reopened) == 0


def test_replay_memory_tightens_a_loose_file_and_refuses_a_symlink(tmp_path: Path) -> None:
    loose = tmp_path / "loose.sqlite"
    loose.touch(mode=0o644)
    os.chmod(loose, 0o644)
    ReplayMemory(loose).close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    (tmp_path / "elsewhere").touch()
    (tmp_path / "link.sqlite").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="replay memory"):
        ReplayMemory(tmp_path / "link.sqlite")


# Policy names in a delivery: a name, never a path.

HOSTILE_NAMES = [
    "../../etc/passwd", "/abs", "/etc/passwd", "default.yaml", "Default", "de fault", "..",
    "default/../strict", "default\x00", "", "x" * 65, "default\n", "~root", "%2e%2e",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_delivery_policy_name_must_follow_the_rule(name: str) -> None:
    with pytest.raises(PolicyError, match=r"\^\[a-z0-9_-\]\+\$") as error:
        find_policy(name, None, POLICIES)
    if name.strip():
        assert name not in str(error.value)


@pytest.mark.parametrize("name", ["default", "strict"])
def test_the_shipped_policies_are_found_by_name(name: str) -> None:
    assert find_policy(name, None, POLICIES) == (POLICIES / f"{name}.yaml").resolve()


def test_a_symlink_out_of_the_policies_folder_is_refused(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "good.yaml").write_text((POLICIES / "default.yaml").read_text())
    outside = tmp_path / "secret.yaml"
    outside.write_text((POLICIES / "default.yaml").read_text())
    (policies / "escape.yaml").symlink_to(outside)
    with pytest.raises(PolicyError, match="outside the policies folder") as error:
        find_policy("escape", None, policies)
    assert "escape" not in str(error.value) and str(tmp_path) not in str(error.value)
    with pytest.raises(PolicyError, match="known: good") as missing:
        find_policy("nosuch", None, policies)
    assert "nosuch" not in str(missing.value)


def test_an_untrusted_spec_error_names_field_and_rule_but_echoes_nothing() -> None:
    """What the webhook answers 422 with: the field path and the reason, never the input."""
    planted = "PLANTED<script>value"
    spec = {
        "service": planted,
        "candidate": {"manifest": {"model_id": planted}, "signature": planted},
        "canary": {"steps": [{"weight": 5}, {"weight": 1}], "max_extensions": planted},
        planted: 1,
        "policy": planted,
    }
    with pytest.raises(PolicyError) as policy:
        spec_from_data(spec, "the delivery's spec", None, POLICIES, untrusted=True)
    assert planted not in str(policy.value)
    del spec["policy"]
    with pytest.raises(SpecError) as error:
        spec_from_data(spec, "the delivery's spec", None, POLICIES, untrusted=True)
    text = str(error.value)
    assert planted not in text and "got" not in text and "[5" not in text
    assert "candidate.manifest.model_id" in text and "[value_error]" in text
    assert "canary.max_extensions" in text and "[int_parsing]" in text
    assert "canary.steps: Value error, canary weights must not decrease" in text
    assert "unknown field (extra fields are not permitted) [extra_forbidden]" in text
    # A local spec file (the CLI) still shows what was wrong with it.
    with pytest.raises(SpecError, match="got 'PLANTED"):
        spec_from_data(spec, "release.yaml", None, POLICIES)
