"""Probes on the model service: labelled requests scored when their record is written.

A probe is a synthetic request (Envoy's synthetic listener marked it) that names the suite item
it asks in `x-canaryflow-probe: <suite>/<item id>`; the sender is `canaryflow.local.probes`.
The record keeps that reference in `probe` and the item's verdict in `probe_passed`, from the
offline text scorers (`evaluation.scorers`, the same functions the offline gate runs), so
accuracy on labelled queries is measured on the live path. Scoring happens in the record
worker, never on the request path. A header on a user's request is never honoured: the service
reads it only when Envoy marked the request synthetic, and Envoy drops users' marks.

Suites come from the service's policy (its `probes` checkers, by file stem) or the packaged
ones by name; each is loaded once, at most `MAX_SUITES` kept. An unknown suite or item, an
answer that is not a 200, or an item whose scorer needs a model is not scored (None), never a
pass or a fail.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from canaryflow.contracts import CheckerConfig, ProbesChecker
from canaryflow.errors import ConfigError
from canaryflow.evaluation.scorers import SCORERS, score
from canaryflow.evaluation.suites import EvalItem, available_suites, load_suite

log = logging.getLogger("canaryflow.serve")

PROBE_HEADER = "x-canaryflow-probe"
MAX_SUITES = 8  # suites kept loaded per service: a probe names one of a policy's few
MAX_REFERENCE = 200  # characters of a reference kept; longer is not a probe
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def probe_suites(checkers: Iterable[CheckerConfig] | None) -> tuple[str, ...]:
    """The suites a policy's `probes` checkers name (names or paths), in order."""
    return tuple(c.suite for c in checkers or () if isinstance(c, ProbesChecker))


def reference(suite: str, item_id: str) -> str:
    """The header value naming `item_id` of `suite` (the suite's name, not its path)."""
    return f"{suite}/{item_id}"


def scorable(items: Iterable[EvalItem]) -> list[EvalItem]:
    """The items a service can score by itself (text scorers; not those calling a model)."""
    return [item for item in items if item.scorer in SCORERS]


class ProbeScorer:
    """Each probe's verdict from its suite item's scorer; suites loaded once, bounded."""

    def __init__(self, suites: Sequence[str] = (), max_suites: int = MAX_SUITES) -> None:
        # name -> what to load: the policy's suites by file stem, so the sender can name them.
        self._sources = {Path(s).stem if s.endswith(".jsonl") else s: s for s in suites}
        self._max = max_suites
        self._loaded: OrderedDict[str, dict[str, EvalItem] | None] = OrderedDict()

    @staticmethod
    def parse(value: str | None) -> tuple[str, str] | None:
        """(suite, item id) of a header value, None when it is not a probe reference."""
        if not value or len(value) > MAX_REFERENCE:
            return None
        suite, sep, item_id = value.partition("/")
        if not sep or not item_id or not _NAME.match(suite):
            return None
        return suite, item_id

    def load(self, suite: str) -> dict[str, EvalItem] | None:
        """The suite's items by id (None: no such suite); blocking file I/O on first use, so
        the record worker calls it from a thread (`prepare`)."""
        if suite in self._loaded:
            self._loaded.move_to_end(suite)
            return self._loaded[suite]
        source = self._sources.get(suite)
        if source is None and suite in available_suites():
            source = suite
        items: dict[str, EvalItem] | None = None
        if source is not None:
            try:
                items = {item.id: item for item in load_suite(source).items}
            except ConfigError as exc:
                log.warning(
                    "probe suite %s cannot be loaded: %s; its probes are unscored", suite, exc
                )
        self._loaded[suite] = items
        while len(self._loaded) > self._max:
            self._loaded.popitem(last=False)
        return items

    def prepare(self, values: Iterable[str | None]) -> None:
        """Load the suites `values` name that are not loaded yet."""
        for value in values:
            parsed = self.parse(value)
            if parsed is not None and parsed[0] not in self._loaded:
                self.load(parsed[0])

    def verdict(self, value: str | None, status: int, answer: str) -> bool | None:
        """Whether `answer` passes the item `value` names; None when it cannot be told."""
        parsed = self.parse(value)
        if parsed is None or status != 200:
            return None
        items = self.load(parsed[0])
        item = items.get(parsed[1]) if items is not None else None
        if item is None or item.scorer not in SCORERS:
            return None
        result = score(item, answer)
        return result.passed if result.scored else None
