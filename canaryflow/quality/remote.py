"""The live checkers in a process of their own, fed by the model service.

Why a process: a judge or moderation call costs ~1 ms of CPU (JSON, HTTP, TLS). On the model
service's event loop those slices run between users' requests; they showed in the users' tail,
and the latency gates compare exactly that tail between stable and candidate (a candidate's
service judging more answers looked slower). In a child process the OS scheduler shares the
cores, and the service's loop only writes one line per sampled answer.

The parent side (`RemoteCheckers`) samples (`pipeline.Sampler`: rate, per-role floor, budget),
bounds what is in flight per checker (over it: dropped, counted) and hands each sampled item to
the child as a JSON line on its stdin; the child (`python -m canaryflow.quality.remote`) runs a
`CheckerPipeline` and answers one JSON line per result on its stdout. If the child dies, what
it held comes back as failed ("unchecked", never passed), offers are dropped while it is down,
and it is started again after a pause that grows to `MAX_RESTART_PAUSE_S`. The owner stops it:
`aclose` closes its stdin and waits, then kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from pydantic import TypeAdapter

from canaryflow.contracts import CheckerConfig, ProvidersFile
from canaryflow.errors import ConfigError
from canaryflow.quality.pipeline import (
    CheckerCounters,
    CheckerPipeline,
    Sampler,
    build_checkers,
)
from canaryflow.quality.verdicts import CheckItem, CheckResult, Outcome, Verdict, unchecked

log = logging.getLogger("canaryflow.checkers")

MAX_LINE_BYTES = 1 << 20  # a result line: verdicts with reasons (bounded), never a whole text
MAX_RESTART_PAUSE_S = 30.0
STOP_WAIT_S = 5.0
_CONFIGS = TypeAdapter(list[CheckerConfig])


class RemoteCheckers:
    """`submit_to(item)` from the service's loop; results to `on_result` as the child answers.

    Same surface as `CheckerPipeline` where `live_checks.LiveChecks` uses it: `configs`,
    `counters`, `submit_to`, `longest_timeout_s`, `start`, `aclose`."""

    def __init__(
        self,
        configs: Sequence[CheckerConfig],
        providers: ProvidersFile | None,
        on_result: Callable[[CheckResult], None],
        *,
        queue_size: int = 1000,
        workers: int = 16,
        source: str = "providers",
        seed: int | None = None,
    ) -> None:
        if queue_size < 1 or workers < 1:
            raise ConfigError("checker process: queue_size and workers must be at least 1")
        # Built here only to fail at start-up with the configuration's own error; the child
        # builds its own.
        build_checkers(configs, providers, source=source)
        rng = random.Random(seed)
        self.configs: dict[str, CheckerConfig] = {c.label: c for c in configs}
        self.samplers = {name: Sampler(c, rng) for name, c in self.configs.items()}
        self.on_result = on_result
        self.queue_size = queue_size
        self._setup = {
            "checkers": [c.model_dump(mode="json") for c in configs],
            "providers": None if providers is None else providers.model_dump(mode="json"),
            "source": source,
            "workers": workers,
            "queue_size": queue_size,
        }
        self._environment = checker_environment(configs, providers)
        self._process: asyncio.subprocess.Process | None = None
        self._in_flight: dict[int, tuple[CheckItem, set[str]]] = {}
        self._loads: Counter[str] = Counter()  # items in flight per checker, kept as they move
        self._next_id = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._closing = False
        self.restarts = 0

    @property
    def counters(self) -> dict[str, CheckerCounters]:
        return {name: sampler.counters for name, sampler in self.samplers.items()}

    @property
    def longest_timeout_s(self) -> float:
        """As `CheckerPipeline.longest_timeout_s`: the checker's timeout and a second of grace."""
        return max((c.timeout_s + 1.0 for c in self.configs.values()), default=0.0)

    def submit_to(self, item: CheckItem) -> list[str]:
        """Sample `item` for every checker and send it to the child; never waits. Returns the
        names that took it (each delivers exactly one result for it)."""
        names = [name for name, sampler in self.samplers.items() if sampler.wants(item.role)]
        if not names:
            return []
        process = self._process
        busy = {name for name in names if self._loads[name] >= self.queue_size}
        if process is None or process.stdin is None or not self._up.is_set():
            busy = set(names)  # the child is down: nothing can be checked now
        for name in busy:
            self.samplers[name].counters.dropped += 1
        taken = [name for name in names if name not in busy]
        if not taken:
            return []
        assert process is not None and process.stdin is not None
        self._next_id += 1
        key = self._next_id
        line = {"id": key, "checkers": taken, "item": asdict(item)}
        try:
            process.stdin.write(json.dumps(line).encode() + b"\n")
        except (OSError, RuntimeError):  # the child just went away: as if it were down
            for name in taken:
                self.samplers[name].counters.dropped += 1
            return []
        self._in_flight[key] = (item, set(taken))
        for name in taken:
            self.samplers[name].took(item.role)
            self._loads[name] += 1
        return taken

    async def start(self) -> RemoteCheckers:
        """Start the child and wait (up to 30 s) until its checkers are up."""
        self._closing = False
        self._supervisor = asyncio.create_task(self._supervise(), name="checker-process")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await self._up.wait()
        if not self._up.is_set():
            log.error(
                "the checker process did not start in 30 s; answers go unchecked until it does"
            )
        return self

    async def aclose(self) -> None:
        self._closing = True
        process = self._process
        if process is not None and process.stdin is not None:
            process.stdin.close()
        if self._supervisor is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAIT_S):
                    await asyncio.shield(self._supervisor)
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def _supervise(self) -> None:
        pause = 1.0
        while not self._closing:
            try:
                await self._run_child()
                pause = 1.0
            except (OSError, ValueError) as exc:
                log.error("the checker process failed: %s", exc)
            finally:
                self._up.clear()
                self._fail_in_flight("the checker process exited")
            if self._closing:
                return
            self.restarts += 1
            log.warning("the checker process exited; starting it again in %g s", pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RESTART_PAUSE_S)

    async def _run_child(self) -> None:
        process = self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "canaryflow.quality.remote",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_LINE_BYTES,
            env=self._environment,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(self._setup).encode() + b"\n")
            while line := await process.stdout.readline():
                self._on_line(json.loads(line))
        finally:
            if process.returncode is None and self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_WAIT_S):
                        await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()

    def _on_line(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            self._up.set()
            return
        if "error" in message:
            log.error("the checker process refused its configuration: %s", message["error"])
            return
        entry = self._in_flight.get(message["id"])
        name = message["checker"]
        if entry is None or name not in entry[1]:
            return  # failed already (the child restarted): its record was released then
        item, names = entry
        names.discard(name)
        if not names:
            del self._in_flight[message["id"]]
        verdicts = tuple(_verdict(v) for v in message["verdicts"])
        self._deliver(CheckResult(item, name, message["kind"], verdicts))

    def _fail_in_flight(self, why: str) -> None:
        pending, self._in_flight = self._in_flight, {}
        for item, names in pending.values():
            for name in names:
                verdicts = unchecked(name, ("check",), why)
                self._deliver(CheckResult(item, name, self.configs[name].kind, verdicts))

    def _deliver(self, result: CheckResult) -> None:
        self._loads[result.checker] -= 1
        self.samplers[result.checker].count(result)
        try:
            self.on_result(result)
        except Exception:
            log.exception("the checker result callback failed for %s", result.checker)


def checker_environment(
    configs: Sequence[CheckerConfig], providers: ProvidersFile | None
) -> dict[str, str]:
    """The service's environment without the provider keys no checker calls with: the child
    needs its judge's key, not the models' (`/proc/PID/environ` is readable by every process
    of the same user)."""
    if providers is None:
        return dict(os.environ)
    entries = providers.providers
    keys = {entry.api_key_env for entry in entries.values() if entry.api_key_env}
    used = {
        entries[name].api_key_env
        for name in (getattr(c, "provider", None) for c in configs)
        if name in entries
    }
    return {name: value for name, value in os.environ.items() if name not in keys - used}


def _verdict(raw: dict[str, Any]) -> Verdict:
    raw["outcome"] = Outcome(raw["outcome"])
    raw["categories"] = tuple(raw.get("categories") or ())
    return Verdict(**raw)


# --------------------------------------------------------------------------- the child


async def _child() -> None:
    # Background work: when the cores are busy, the service answering users goes first.
    with contextlib.suppress(OSError):
        os.nice(10)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES * 32)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    setup = json.loads(await reader.readline())
    try:
        configs = _CONFIGS.validate_python(setup["checkers"])
        raw_providers = setup["providers"]
        providers = None if raw_providers is None else ProvidersFile.model_validate(raw_providers)
        checkers = build_checkers(configs, providers, source=setup["source"])
    except (ConfigError, ValueError) as exc:
        send({"error": str(exc)})
        return
    keys: dict[int, int] = {}  # id(CheckItem) -> the parent's id
    items: dict[int, tuple[CheckItem, int]] = {}  # the parent's id -> item, results to come

    def on_result(result: CheckResult) -> None:
        key = keys[id(result.item)]
        verdicts = [asdict(v) for v in result.verdicts]
        send({"id": key, "checker": result.checker, "kind": result.kind, "verdicts": verdicts})
        item, left = items[key]
        if left > 1:
            items[key] = (item, left - 1)
        else:
            del items[key], keys[id(item)]

    pipeline = CheckerPipeline(
        checkers, on_result, queue_size=setup["queue_size"], workers=setup["workers"]
    )
    await pipeline.start()
    send({"ready": True})
    try:
        while line := await reader.readline():
            message = json.loads(line)
            item, names = CheckItem(**message["item"]), message["checkers"]
            keys[id(item)], items[message["id"]] = message["id"], (item, len(names))
            for name in set(names) - set(pipeline.enqueue(item, names)):
                why = unchecked(name, ("check",), "the checker's queue was full")
                on_result(CheckResult(item, name, pipeline.config_of(name).kind, why))
    finally:
        await pipeline.aclose()  # what is still queued is failed by the parent


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child())


if __name__ == "__main__":
    main()
