"""What the release record says at the end: a waiver is never hidden behind 'every gate passed'."""

from __future__ import annotations

from canaryflow.contracts import CompatibilityReport, ReleaseRecord, Stage, Waiver


def record() -> ReleaseRecord:
    return ReleaseRecord(release_id="r", service="s", candidate="c")


def test_a_clean_promotion_says_every_gate_passed() -> None:
    promoted = record()
    promoted.promote()
    assert (promoted.decision, promoted.reason) == ("promoted", "every gate passed")


def test_a_promotion_after_a_waiver_names_gate_approver_and_reason() -> None:
    promoted = record()
    promoted.waivers.append(
        Waiver(stage=Stage.CANARY, gates=("cost_per_1k",), approver="alice", reason="launch")
    )
    promoted.promote()
    assert promoted.reason == (
        "promoted with 1 waived gate finding(s): cost_per_1k (alice: launch)"
    )


def test_preflight_names_an_overridden_incompatibility() -> None:
    assert CompatibilityReport(compatible=True).describe() == "compatible"
    overridden = CompatibilityReport(compatible=False, problems=("tokenizer changed",))
    assert overridden.describe() == (
        "compatibility overridden (allow_incompatible): tokenizer changed"
    )
