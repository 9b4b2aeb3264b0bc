"""The probe sender: a suite's labelled items, asked of stable and the candidate while it is live.

Each tick takes the suite's next item (in turn, round and round) and asks it of every target
role, through Envoy's synthetic listener with `x-canaryflow-probe-target: <role>` (Envoy routes
it to that role's cluster, never mirrored) and `x-canaryflow-probe: <suite>/<item id>` (the
model service stores and scores it; `canaryflow.dataplane.probes`). Stable and the candidate
get the same items at the same rate, so the `probe_accuracy` gate compares like with like.

Bounded: one thread, one request in flight, each with a timeout; a tick that comes late is
skipped, never caught up in a burst. Failures (refused, timed out, non-200, the targets not
readable) are counted in the report, never raised: probes are evidence, not the release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from canaryflow.dataplane.envoy_config import PROBE_TARGET_HEADER
from canaryflow.dataplane.probes import PROBE_HEADER, reference, scorable
from canaryflow.errors import ConfigError
from canaryflow.evaluation.suites import EvalItem, Suite

log = logging.getLogger("canaryflow.probes")

CHAT_PATH = "/v1/chat/completions"


@dataclass
class ProbeReport:
    """What a sender did: requests per target role, answered (200) and failed."""

    suite: str
    sent: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    last_error: str = ""

    def describe(self) -> str:
        roles = ", ".join(f"{r} {self.answered[r]}/{n}" for r, n in sorted(self.sent.items()))
        failed = f"; {self.errors} failed (last: {self.last_error})" if self.errors else ""
        return f"probes of {self.suite}: {roles or 'none sent'}{failed}"


class ProbeSender:
    """Asks `suite`'s items of the roles `targets()` names, at `rate_per_s` items per second.

    `targets` is called at every tick (the candidate's role changes from shadow to canary as
    the release goes on); an empty answer sends nothing that tick. `start` returns at once,
    `stop` ends the thread within about `timeout_s` and returns the report.
    """

    def __init__(
        self,
        url: str,
        suite: Suite,
        rate_per_s: float,
        targets: Callable[[], Sequence[str]],
        *,
        timeout_s: float = 10.0,
    ) -> None:
        items = scorable(suite.items)
        if not items:
            raise ConfigError(
                f"probe suite {suite.name} has no item a model service can score (its items "
                "all use a scorer that calls a model): pick a suite with text scorers"
            )
        if rate_per_s <= 0:
            raise ConfigError(f"rate_per_s must be above 0, got {rate_per_s}")
        self.url = url.rstrip("/")
        self.suite = suite
        self.items: list[EvalItem] = items
        self.interval_s = 1.0 / rate_per_s
        self.targets = targets
        self.timeout_s = timeout_s
        self.report = ProbeReport(suite.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ProbeSender:
        if self._thread is not None:
            raise ConfigError("this ProbeSender was started already: make a new one")
        self._thread = threading.Thread(target=self._run, name="canaryflow-probes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ProbeReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5.0)
            if self._thread.is_alive():
                log.warning("the probe sender of %s did not stop in time", self.suite.name)
        return self.report

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            turn = 0
            due = time.monotonic()
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                self._tick(client, self.items[turn % len(self.items)])
                turn += 1
                due = max(due + self.interval_s, time.monotonic())  # late: skip, never burst

    def _tick(self, client: httpx.Client, item: EvalItem) -> None:
        try:
            roles = list(self.targets())
        except Exception as exc:
            self._failed(f"targets: {type(exc).__name__}: {exc}")
            return
        body = {"model": "canaryflow", "messages": [{"role": "user", "content": item.input}]}
        headers = {PROBE_HEADER: reference(self.suite.name, item.id)}
        for role in roles:  # a tick begun is finished: each item is asked of every role
            self.report.sent[role] += 1
            try:
                response = client.post(
                    CHAT_PATH, json=body, headers={**headers, PROBE_TARGET_HEADER: role}
                )
            except httpx.HTTPError as exc:
                self._failed(f"{role}: {type(exc).__name__}: {exc}")
                continue
            if response.status_code == 200:
                self.report.answered[role] += 1
            else:
                self._failed(f"{role}: HTTP {response.status_code}")

    def _failed(self, reason: str) -> None:
        self.report.errors += 1
        self.report.last_error = reason[:300]
