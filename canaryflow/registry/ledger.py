"""The release ledger: one MLflow run per release, in experiment `canaryflow-releases`.

The decision (promoted, rolled back, rejected) is written here by the release itself, so it
never has to be inferred from how the orchestrator's run ended. Every call is an HTTP round
trip (50-300 ms), so tags, params and metrics go out together through `log_batch`.
Nightly evaluations get one run each in `canaryflow-nightly/<service>`, drift tagged on the run.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from canaryflow.contracts import (
    EvalItemResult,
    EvalReport,
    Label,
    PublishedVersion,
    ReleaseRecord,
    StageOutcome,
)
from canaryflow.errors import RegistryError
from canaryflow.registry.mlflow_client import MlflowConnection, mlflow_errors

EXPERIMENT = "canaryflow-releases"
RECORD_FILE = "record.json"
SPEC_FILE = "spec.json"
STAGES_DIR = "stages"

TAG_RELEASE_ID = "canaryflow.release_id"
TAG_SERVICE = "canaryflow.service"
TAG_DECISION = "canaryflow.decision"
TAG_REASON = "canaryflow.reason"
TAG_STAGE = "canaryflow.stage."

OFFLINE_ITEMS = "offline_eval_items.json"
TAG_OFFLINE_DECISION = "canaryflow.offline_decision"

NIGHTLY_EXPERIMENT = "canaryflow-nightly/"
NIGHTLY_REPORT = "nightly_eval.json"
TAG_DRIFT = "canaryflow.drift"
TAG_DRIFT_SUITES = "canaryflow.drift_suites"
TAG_SUITE = "canaryflow.suite."

MAX_TAG = 8000
MAX_PARAM = 6000
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class ReleaseLedger(MlflowConnection):
    def start(self, record: ReleaseRecord, spec_json: dict[str, Any]) -> str:
        """Open the release's run; a retried start finds the run it opened before."""
        existing = self.find(record.release_id)
        if existing is not None:
            return existing
        experiment_id = self.experiment_id(EXPERIMENT)
        assert experiment_id is not None
        with mlflow_errors(f"starting the ledger of release {record.release_id}"):
            run = self.client.create_run(
                experiment_id,
                run_name=record.release_id,
                tags={
                    TAG_RELEASE_ID: record.release_id,
                    TAG_SERVICE: record.service,
                    TAG_DECISION: "running",
                },
            )
            run_id = run.info.run_id
            self._batch(run_id, params=_params(record, spec_json))
            self.client.log_dict(run_id, spec_json, SPEC_FILE)
            stored = record.model_copy(update={"ledger_run_id": run_id})
            self.client.log_dict(run_id, stored.model_dump(mode="json"), RECORD_FILE)
        return str(run_id)

    def log_stage(self, run_id: str, outcome: StageOutcome) -> None:
        stage = _key(outcome.key)
        metrics = {f"{stage}.{_key(name)}": value for name, value in outcome.metrics.items()}
        with mlflow_errors(f"recording stage {outcome.key} in run {run_id}"):
            self._batch(run_id, metrics=metrics, tags={f"{TAG_STAGE}{stage}": outcome.outcome})
            # One file per stage outcome: appending to one file would cost a download too.
            stamp = outcome.at.strftime("%Y%m%dT%H%M%S%f")
            self.client.log_dict(
                run_id, outcome.model_dump(mode="json"), f"{STAGES_DIR}/{stamp}-{stage}.json"
            )

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        with mlflow_errors(f"logging metrics to run {run_id}"):
            self._batch(run_id, metrics={_key(k): v for k, v in metrics.items()}, step=step)

    def log_json(self, run_id: str, name: str, obj: Any) -> None:
        with mlflow_errors(f"logging {name} to run {run_id}"):
            self.client.log_dict(run_id, obj, name if name.endswith(".json") else f"{name}.json")

    def log_text(self, run_id: str, name: str, text: str) -> None:
        with mlflow_errors(f"logging {name} to run {run_id}"):
            self.client.log_text(run_id, text, name)

    def log_offline_results(self, run_id: str, report: EvalReport, model_id: str | None) -> None:
        """The offline gate's per-suite rates and deltas as metrics of this run, linked to the
        candidate's LoggedModel so MLflow's model page shows them, and its per-item answers as
        an MLflow table (the run's artifact view). `model_id` None (a version published before
        it had a LoggedModel): the run alone gets them."""
        metrics = _nightly_metrics(report)
        rows = [item.model_dump(mode="json") for item in report.items]
        table = {key: [row[key] for row in rows] for key in EvalItemResult.model_fields}
        with mlflow_errors(f"logging the offline results to run {run_id}"):
            self._batch(run_id, metrics=metrics, model_id=model_id)
            self.client.log_table(run_id, table, OFFLINE_ITEMS)
            if model_id is not None:
                self.client.set_logged_model_tags(
                    model_id, {TAG_OFFLINE_DECISION: report.decision.value}
                )

    def finish(self, run_id: str, record: ReleaseRecord, crashed: bool = False) -> None:
        """Close the run. FAILED only when the release crashed (or never reached a decision):
        a rollback is a release that worked."""
        failed = crashed or record.decision == "running"
        stored = record.model_copy(update={"ledger_run_id": run_id})
        tags = {TAG_DECISION: "crashed" if crashed else record.decision, TAG_REASON: record.reason}
        if record.candidate_version is not None:
            tags["canaryflow.candidate_version"] = record.candidate_version
        with mlflow_errors(f"finishing the ledger of release {record.release_id}"):
            self._batch(run_id, tags=tags)
            self.client.log_dict(run_id, stored.model_dump(mode="json"), RECORD_FILE)
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def find(self, release_id: str) -> str | None:
        experiment_id = self.experiment_id(EXPERIMENT, create=False)
        if experiment_id is None:
            return None
        quoted = release_id.replace("'", "\\'")
        with mlflow_errors(f"looking for release {release_id}"):
            runs = self.client.search_runs(
                [experiment_id], f"tags.`{TAG_RELEASE_ID}` = '{quoted}'", max_results=1
            )
        return str(runs[0].info.run_id) if runs else None

    def record(self, run_id: str) -> ReleaseRecord:
        """The finished record; for a release still running, the start record plus its stages."""
        with (
            mlflow_errors(f"reading the record of run {run_id}"),
            tempfile.TemporaryDirectory() as tmp,
        ):
            path = self.client.download_artifacts(run_id, RECORD_FILE, tmp)
            record = _validate_record(Path(path).read_text(), run_id)
            if record.decision != "running":
                return record
            stages = []
            if self.client.list_artifacts(run_id, STAGES_DIR):  # none logged yet: no folder
                stages_dir = Path(self.client.download_artifacts(run_id, STAGES_DIR, tmp))
                stages = [
                    StageOutcome.model_validate_json(p.read_text())
                    for p in sorted(stages_dir.glob("*.json"))
                ]
        return record.model_copy(update={"stages": stages})

    def record_nightly(
        self,
        champion: PublishedVersion,
        reference: PublishedVersion,
        report: EvalReport,
        tags: dict[str, str] | None = None,
    ) -> NightlyRun:
        """One finished run per nightly evaluation: the champion measured against `reference`."""
        service = champion.service
        drifted = drift_suites(report)
        experiment_id = self.experiment_id(NIGHTLY_EXPERIMENT + service)
        assert experiment_id is not None
        all_tags = {
            TAG_SERVICE: service,
            TAG_DECISION: report.decision.value,
            TAG_DRIFT: "yes" if drifted else "no",
            TAG_DRIFT_SUITES: ",".join(drifted),
            **{f"{TAG_SUITE}{_key(s.suite)}": s.result.label.value for s in report.suites},
            **(tags or {}),
        }
        params = {
            "service": service,
            "champion_version": champion.version,
            "champion_model_id": champion.signed.manifest.model_id,
            "reference_version": reference.version,
            "reference_model_id": reference.signed.manifest.model_id,
            "suites": json.dumps([s.suite for s in report.suites]),
        }
        with mlflow_errors(f"recording the nightly evaluation of {service}"):
            run = self.client.create_run(
                experiment_id, run_name=f"nightly-{service}", tags=all_tags
            )
            run_id = str(run.info.run_id)
            self._batch(run_id, metrics=_nightly_metrics(report), params=params)
            self.client.log_dict(run_id, report.model_dump(mode="json"), NIGHTLY_REPORT)
            self.client.set_terminated(run_id, "FINISHED")
        return NightlyRun(run_id=run_id, drift_suites=drifted)

    def _batch(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        step: int | None = None,
        model_id: str | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, step or 0, model_id=model_id)
                for k, v in (metrics or {}).items()
            ],
            params=[Param(k, v[:MAX_PARAM]) for k, v in (params or {}).items()],
            tags=[RunTag(k, v[:MAX_TAG]) for k, v in (tags or {}).items()],
            synchronous=True,
        )


@dataclass(frozen=True)
class NightlyRun:
    run_id: str
    drift_suites: tuple[str, ...]

    @property
    def drift(self) -> bool:
        return bool(self.drift_suites)


def drift_suites(report: EvalReport) -> tuple[str, ...]:
    """Suites where the champion is worse than its reference beyond the policy's margin."""
    return tuple(s.suite for s in report.suites if s.result.label is Label.FAIL)


def _nightly_metrics(report: EvalReport) -> dict[str, float]:
    metrics = {"tokens": float(report.tokens), "cost_usd": report.cost_usd}
    for s in report.suites:
        suite = _key(s.suite)
        metrics |= {
            f"{suite}.accuracy": s.candidate_rate,
            f"{suite}.reference_accuracy": s.baseline_rate,
            f"{suite}.delta": s.diff,
            f"{suite}.delta_ci_low": s.diff_ci[0],
            f"{suite}.delta_ci_high": s.diff_ci[1],
            f"{suite}.p_value": s.mcnemar_p,
            f"{suite}.margin": s.margin,
            f"{suite}.n": float(s.n),
        }
    return metrics


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, `_-. /` only."""
    return _UNSAFE_KEY.sub("_", name)


def _params(record: ReleaseRecord, spec: dict[str, Any]) -> dict[str, str]:
    canary = spec.get("canary") or {}
    shadow = spec.get("shadow") or {}
    policy = spec.get("policy") or {}
    params = {
        "service": record.service,
        "candidate": record.candidate,
        "candidate_version": record.candidate_version or "",
        "baseline_alias": str(spec.get("baseline_alias", "champion")),
        "baseline_version": record.baseline_version or "",
        "canary_weights": json.dumps([s.get("weight") for s in canary.get("steps", [])]),
        "policy": str(policy.get("name", "")) if isinstance(policy, dict) else str(policy),
        "shadow_enabled": str(shadow.get("enabled", "")),
        "shadow_mirror_percent": str(shadow.get("mirror_percent", "")),
        "suites": json.dumps(spec.get("suites", [])),
    }
    return {k: v for k, v in params.items() if v != ""}


def _validate_record(text: str, run_id: str) -> ReleaseRecord:
    try:
        return ReleaseRecord.model_validate_json(text)
    except ValidationError as exc:
        raise RegistryError(
            f"the record stored in ledger run {run_id} does not validate ({exc.error_count()} "
            "problem(s)); it was edited by hand or written by another version"
        ) from exc
