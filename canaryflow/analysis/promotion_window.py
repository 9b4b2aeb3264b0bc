"""Is the promotion window open now, and if not, when does it open? Pure: the clock is an input.

The window is wall-clock time in its zone, so each day's opening and closing are turned into
instants with that day's offset: a window on the night clocks go forward can be shorter or empty,
on the night they go back longer (`PromotionWindow`'s docstring). All instants returned are UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from canaryflow.contracts.schedule import PromotionWindow

# Far enough to pass any DST gap that empties one week's only window.
_SEARCH_DAYS = 15


@dataclass(frozen=True)
class WindowCheck:
    """`open` now, or the next opening (`opens_at`) and how long until it."""

    open: bool
    opens_at: datetime
    closes_at: datetime
    now: datetime

    @property
    def wait_s(self) -> float:
        return max(0.0, (self.opens_at - self.now).total_seconds())


def _exists(naive: datetime, zone: ZoneInfo) -> bool:
    aware = naive.replace(tzinfo=zone)
    return aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive


def local_instant(day: date, clock: time, zone: ZoneInfo, *, last: bool = False) -> datetime:
    """The UTC instant the wall clock in `zone` shows `clock` on `day`.

    A time skipped by a DST change maps to the change itself (the first moment the wall clock is
    past it); a repeated time maps to its first occurrence, or its last with `last` (so a window
    keeps the whole repeated stretch).
    """
    naive = datetime.combine(day, clock)
    if _exists(naive, zone):
        return naive.replace(tzinfo=zone, fold=1 if last else 0).astimezone(UTC)
    # In a gap: the change lies between the two readings of the offset; find it to the second.
    lo = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    lo, hi = min(lo, hi), max(lo, hi)
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0)


def _interval(window: PromotionWindow, day: date) -> tuple[datetime, datetime]:
    zone = window.zone
    start = local_instant(day, window.opens_at, zone)
    crosses = window.end == "24:00" or window.closes_at <= window.opens_at
    end_day = day + timedelta(days=1) if crosses else day
    end = local_instant(end_day, window.closes_at, zone, last=True)
    return start, end


def check_window(window: PromotionWindow, now: datetime) -> WindowCheck:
    """Open iff `now` falls in some day's [opening, closing); else the next opening."""
    if now.tzinfo is None:
        raise ValueError("check_window needs an aware datetime (UTC), got a naive one")
    now = now.astimezone(UTC)
    today = now.astimezone(window.zone).date()
    days = window.weekdays
    for offset in range(-1, _SEARCH_DAYS):  # yesterday's window may run past midnight
        day = today + timedelta(days=offset)
        if day.weekday() not in days:
            continue
        start, end = _interval(window, day)
        if end <= start or end <= now:
            continue
        return WindowCheck(open=start <= now, opens_at=max(start, now), closes_at=end, now=now)
    raise ValueError(f"the promotion window {window.describe()} never opens in the next weeks")


def _span(seconds: float) -> str:
    minutes = int(-(-seconds // 60))  # round up: "opens in 0 min" would be a lie
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    parts += [f"{hours} h"] if hours else []
    parts += [f"{minutes} min"] if minutes or not parts else []
    return " ".join(parts)


def describe_wait(window: PromotionWindow, check: WindowCheck) -> str:
    """'waiting for the promotion window 02:00-05:00 UTC, opens in 3 h 12 min'."""
    if check.open:
        return f"inside the promotion window {window.describe()}"
    when = check.opens_at.astimezone(window.zone)
    return (
        f"waiting for the promotion window {window.describe()}, opens in {_span(check.wait_s)} "
        f"({when:%a %Y-%m-%d %H:%M %Z})"
    )
