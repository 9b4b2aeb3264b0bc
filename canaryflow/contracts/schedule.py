"""When a release may promote: a weekly promotion window in one IANA time zone.

Teams promote to 100% in low-traffic hours so that a late surprise hits few users and someone is
awake to watch it. The window is wall-clock time in `timezone`; the arithmetic (DST included)
lives in `canaryflow.analysis.promotion_window`.
"""

from __future__ import annotations

import re
from datetime import time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from canaryflow.contracts.base import Frozen

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_CLOCK = re.compile(r"(?P<h>[0-9]{1,2}):(?P<m>[0-9]{2})")
_RANGE = re.compile(r"\s*(?P<a>[a-z]+)\s*(?:\.\.|-)\s*(?P<b>[a-z]+)\s*")


_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _day(name: str) -> int:
    key = name.strip().lower()
    for index, (short, full) in enumerate(zip(DAYS, _FULL, strict=True)):
        if key in (short, full):
            return index
    raise ValueError(f"unknown day {name!r}: use mon, tue, wed, thu, fri, sat, sun")


def parse_days(entries: list[str]) -> tuple[str, ...]:
    """`[mon..fri, sun]` -> ('mon', ..., 'fri', 'sun'): names or ranges (a range may wrap)."""
    found: set[int] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"days: expected day names or ranges like 'mon..fri', got {entry!r}")
        ranged = _RANGE.fullmatch(entry.lower())
        if ranged is None:
            found.add(_day(entry))
            continue
        first, last = _day(ranged["a"]), _day(ranged["b"])
        found.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    if not found:
        raise ValueError("days: name at least one day, e.g. [mon..fri]")
    return tuple(DAYS[i] for i in sorted(found))


def parse_clock(text: str, *, allow_24: bool = False) -> time:
    """'HH:MM' on a 24-hour clock; '24:00' only as an end (midnight at the end of the day)."""
    match = _CLOCK.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a time as 'HH:MM' (24-hour clock), got {text!r}")
    hour, minute = int(match["h"]), int(match["m"])
    if allow_24 and (hour, minute) == (24, 0):
        return time(0, 0)
    if hour > 23 or minute > 59:
        raise ValueError(f"{text!r} is not a time of day: hours 00-23, minutes 00-59")
    return time(hour, minute)


class PromotionWindow(Frozen):
    """Promote only from `start` to `end` (wall clock in `timezone`) on `days`.

    `end` before `start` crosses midnight: the window belongs to the day it opens on. On the night
    clocks go forward a skipped stretch is skipped (the window is shorter, possibly empty); on the
    night they go back a repeated stretch inside the window is part of it (longer).
    """

    days: tuple[str, ...] = Field(DAYS, description="names or ranges: [mon..fri], [sat, sun]")
    start: str = Field(description="HH:MM, opening time (wall clock in `timezone`)")
    end: str = Field(description="HH:MM, closing time; 24:00 for midnight")
    timezone: str = Field("UTC", description="an IANA zone name, e.g. Europe/Berlin")

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError("days: expected a list such as [mon..fri]")
        return parse_days(list(value))

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        parse_clock(value)
        return value.strip()

    @field_validator("end")
    @classmethod
    def _end(cls, value: str) -> str:
        parse_clock(value, allow_24=True)
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> PromotionWindow:
        if self.opens_at == self.closes_at and self.end != "24:00":
            raise ValueError(f"start and end are both {self.start}: the window would be empty")
        return self

    @property
    def opens_at(self) -> time:
        return parse_clock(self.start)

    @property
    def closes_at(self) -> time:
        return parse_clock(self.end, allow_24=True)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def weekdays(self) -> frozenset[int]:
        return frozenset(DAYS.index(day) for day in self.days)

    def describe(self) -> str:
        """'02:00-05:00 UTC' (and the days unless every day)."""
        days = "" if len(self.days) == 7 else f" on {','.join(self.days)}"
        return f"{self.start}-{self.end} {self.timezone}{days}"
