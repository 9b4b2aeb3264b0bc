"""Synthetic live traffic: an open-loop load generator speaking the OpenAI chat API.

Open loop means request i leaves at start + i / rate whether or not earlier ones have answered, so a
slow service meets more concurrent requests instead of fewer (no coordinated omission). Latency is
measured from the moment a request actually left; `max_lag_ms` says how far the generator itself
fell behind its schedule, so its own stalls are not mistaken for the service's. The release flow is
synchronous, so `TrafficRunner` runs the generator in a thread of its own while the flow waits.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import aiohttp
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from canaryflow.errors import ConfigError, StackError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
USER_HEADER = "x-canaryflow-user"
ROLE_HEADER = "x-canaryflow-role"
VERSION_HEADER = "x-canaryflow-version"
PROGRESS_EVERY_S = 1.0
STOP_GRACE_S = 1.0  # in-flight requests get this long after stop() before they are cancelled


class Prompt(BaseModel):
    """One corpus line; extra fields (category, kind, ...) are kept out of the way."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) else v)]
    input: str
    user: str | None = None


class TrafficStats(BaseModel):
    """A progress snapshot, handed to `on_progress` about once a second."""

    model_config = ConfigDict(frozen=True)

    elapsed_s: float
    sent: int
    ok: int
    errors: int
    in_flight: int


class TrafficReport(BaseModel):
    """What a run did. `ok + sum(errors.values()) == sent`."""

    model_config = ConfigDict(frozen=True)

    target_rps: float
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    achieved_rps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    max_lag_ms: float
    roles: dict[str, int]
    versions: dict[str, int]

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / self.sent if self.sent else 0.0


class _Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.in_flight = 0
        self.errors: Counter[str] = Counter()
        self.roles: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.max_lag_s = 0.0

    def stats(self, elapsed_s: float) -> TrafficStats:
        return TrafficStats(
            elapsed_s=elapsed_s,
            sent=self.sent,
            ok=self.ok,
            errors=sum(self.errors.values()),
            in_flight=self.in_flight,
        )


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _endpoint(url: str) -> str:
    """A base URL (an Envoy listener) gets the chat path; a full endpoint stays as it is."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


async def _request(
    session: aiohttp.ClientSession,
    endpoint: str,
    body: bytes,
    headers: dict[str, str],
    tally: _Tally,
) -> None:
    loop = asyncio.get_running_loop()
    tally.in_flight += 1
    started = loop.time()
    try:
        async with session.post(endpoint, data=body, headers=headers) as response:
            await response.read()
            elapsed_ms = (loop.time() - started) * 1000
            if 200 <= response.status < 300:
                tally.ok += 1
                tally.latencies_ms.append(elapsed_ms)
            else:
                tally.errors[str(response.status)] += 1
            if role := response.headers.get(ROLE_HEADER):
                tally.roles[role] += 1
            if version := response.headers.get(VERSION_HEADER):
                tally.versions[version] += 1
    except TimeoutError:
        tally.errors["timeout"] += 1
    except aiohttp.ClientError:
        tally.errors["connection"] += 1
    except asyncio.CancelledError:
        tally.errors["cancelled"] += 1
        raise
    finally:
        tally.in_flight -= 1


def _check(prompts: Sequence[Prompt], rate_rps: float, duration_s: float, users: int) -> None:
    if not prompts:
        raise ConfigError("no prompts to send: give at least one (see load_corpus)")
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise ConfigError(
            f"rate_rps must be a positive number of requests per second, got {rate_rps}"
        )
    if duration_s < 0:
        raise ConfigError(
            f"duration_s must be >= 0 (math.inf runs until stopped), got {duration_s}"
        )
    if users < 1:
        raise ConfigError(f"users must be >= 1, got {users}")


async def run_traffic(
    url: str,
    prompts: Sequence[Prompt],
    *,
    rate_rps: float,
    duration_s: float,
    users: int = 50,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10,
    on_progress: Callable[[TrafficStats], None] | None = None,
    stop: asyncio.Event | None = None,
    max_in_flight: int = 2000,
    stream_share: float = 0.0,
) -> TrafficReport:
    """Send chat completions on a fixed schedule for duration_s (or until `stop` is set).

    A request due while `max_in_flight` are still open is not sent and counts as the error
    `client_overload`, so the schedule never silently turns into a queue. `stream_share` of
    the requests ask for a streamed answer (read whole; latency is the last byte's).
    """
    _check(prompts, rate_rps, duration_s, users)
    if not 0.0 <= stream_share <= 1.0:
        raise ConfigError(f"stream_share must be within [0, 1], got {stream_share}")
    endpoint = _endpoint(url)
    rng = random.Random(seed)
    bodies = [
        json.dumps(
            {"model": "canaryflow", "messages": [{"role": "user", "content": p.input}]}
        ).encode()
        for p in prompts
    ]
    streamed = [
        json.dumps(
            {
                "model": "canaryflow",
                "messages": [{"role": "user", "content": p.input}],
                "stream": True,
            }
        ).encode()
        for p in prompts
    ]
    base_headers = {"content-type": "application/json", **(headers or {})}
    tally = _Tally()
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate_rps
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=max_in_flight, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = loop.time()
        next_progress = start + PROGRESS_EVERY_S
        stopped = False
        index = 0
        while index * interval < duration_s:
            if stop is not None and stop.is_set():
                stopped = True
                break
            now = loop.time()
            due = start + index * interval
            if due > now:
                await asyncio.sleep(min(due - now, 0.1))  # short naps keep stop() prompt
                continue
            tally.max_lag_s = max(tally.max_lag_s, now - due)
            tally.sent += 1
            index += 1
            if len(tasks) >= max_in_flight:
                tally.errors["client_overload"] += 1
            else:
                request_headers = {**base_headers, USER_HEADER: f"user-{rng.randrange(users)}"}
                choice = rng.randrange(len(bodies))
                body = streamed[choice] if rng.random() < stream_share else bodies[choice]
                task = asyncio.create_task(
                    _request(session, endpoint, body, request_headers, tally)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if on_progress is not None and now >= next_progress:
                next_progress += PROGRESS_EVERY_S
                on_progress(tally.stats(now - start))
        # Not stopped: the last request left one interval before the schedule ended.
        sending_s = loop.time() - start + (0.0 if stopped else interval)
        if tasks:
            _, pending = await asyncio.wait(
                set(tasks), timeout=STOP_GRACE_S if stopped else timeout_s + 1
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if on_progress is not None:
            on_progress(tally.stats(loop.time() - start))
    latencies = sorted(tally.latencies_ms)
    return TrafficReport(
        target_rps=rate_rps,
        duration_s=sending_s,
        sent=tally.sent,
        ok=tally.ok,
        errors=dict(tally.errors),
        achieved_rps=tally.sent / sending_s if sending_s > 0 else 0.0,
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p95_ms=_percentile(latencies, 0.95),
        latency_p99_ms=_percentile(latencies, 0.99),
        max_lag_ms=tally.max_lag_s * 1000,
        roles=dict(tally.roles),
        versions=dict(tally.versions),
    )


def load_corpus(name_or_path: str | Path) -> list[Prompt]:
    """A JSONL file of `{"id", "input", ...}` lines, or the name of a packaged corpus ("live")."""
    path = Path(name_or_path)
    if not path.is_file():
        packaged = CORPUS_DIR / f"{name_or_path}.jsonl"
        if not packaged.is_file():
            known = sorted(p.stem for p in CORPUS_DIR.glob("*.jsonl")) or ["(none yet)"]
            raise ConfigError(
                f"corpus {str(name_or_path)!r} not found: give a JSONL file path or one of the "
                f"packaged corpora: {', '.join(known)}"
            )
        path = packaged
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data: Any = json.loads(line)
            prompts.append(Prompt.model_validate(data))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ConfigError(
                f'{path}:{number}: expected a JSON object with "id" and "input" strings: {exc}'
            ) from exc
    if not prompts:
        raise ConfigError(f"{path}: the corpus has no prompts")
    return prompts


class TrafficRunner:
    """`run_traffic` in a thread with its own event loop, for synchronous callers (the flows).

    `start()` returns at once; `stop()` ends the run within about a second and returns the
    report (or raises what the run raised). Usable as a context manager.
    """

    def __init__(
        self,
        url: str,
        prompts: Sequence[Prompt],
        rate_rps: float,
        *,
        duration_s: float = math.inf,
        **options: Any,
    ) -> None:
        _check(prompts, rate_rps, duration_s, options.get("users", 1))
        self.url = url
        self._prompts = list(prompts)
        self._rate_rps = rate_rps
        self._duration_s = duration_s
        self._on_progress: Callable[[TrafficStats], None] | None = options.pop("on_progress", None)
        self._options = options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._report: TrafficReport | None = None
        self._error: BaseException | None = None
        self.stats: TrafficStats | None = None

    def __enter__(self) -> TrafficRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()

    def start(self) -> TrafficRunner:
        if self._thread is not None:
            raise ConfigError("this TrafficRunner was started already: make a new one")
        self._thread = threading.Thread(target=self._main, name="canaryflow-traffic", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        return self

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> TrafficReport:
        if self._thread is None:
            raise ConfigError("TrafficRunner.stop() before start()")
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise StackError(f"traffic did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report

    def _progress(self, stats: TrafficStats) -> None:
        self.stats = stats
        if self._on_progress is not None:
            self._on_progress(stats)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._report = loop.run_until_complete(self._run())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _run(self) -> TrafficReport:
        self._stop = asyncio.Event()
        self._ready.set()
        return await run_traffic(
            self.url,
            self._prompts,
            rate_rps=self._rate_rps,
            duration_s=self._duration_s,
            on_progress=self._progress,
            stop=self._stop,
            **self._options,
        )
