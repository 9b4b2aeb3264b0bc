"""The promotion window: validation, and the time arithmetic on fixed clocks (DST included)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from canaryflow.analysis.promotion_window import check_window, describe_wait
from canaryflow.contracts import PromotionWindow

WEEKDAYS = {"days": ["mon..fri"], "start": "02:00", "end": "05:00", "timezone": "UTC"}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_days_accept_names_ranges_and_wrapping_ranges() -> None:
    assert PromotionWindow(**WEEKDAYS).days == ("mon", "tue", "wed", "thu", "fri")
    wrap = PromotionWindow(days=["fri..mon"], start="01:00", end="02:00")
    assert wrap.days == ("mon", "fri", "sat", "sun")
    assert PromotionWindow(days=["Saturday", "sun"], start="1:00", end="2:00").days == (
        "sat",
        "sun",
    )
    assert len(PromotionWindow(start="01:00", end="02:00").days) == 7


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("days", ["mon..fry"], "unknown day 'fry'"),
        ("days", [], "at least one day"),
        ("start", "2am", "HH:MM"),
        ("start", "24:00", "not a time of day"),
        ("end", "05:60", "not a time of day"),
        ("timezone", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("end", "02:00", "would be empty"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(field: str, value: object, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        PromotionWindow(**{**WEEKDAYS, field: value})


def test_release_spec_takes_the_window_from_yaml_shape() -> None:
    from canaryflow.contracts import ReleaseSpec

    field = ReleaseSpec.model_fields["promote_within"]
    assert field.default is None  # no window: promote at once, as before


def test_inside_the_window_is_open_now() -> None:
    check = check_window(PromotionWindow(**WEEKDAYS), utc(2026, 12, 2, 3, 30))  # a Wednesday
    assert check.open and check.wait_s == 0
    assert check.closes_at == utc(2026, 12, 2, 5, 0)


def test_the_end_is_exclusive_and_the_wait_is_said_in_hours_and_minutes() -> None:
    window = PromotionWindow(**WEEKDAYS)
    check = check_window(window, utc(2026, 12, 2, 22, 48))  # Wednesday evening
    assert not check.open
    assert check.opens_at == utc(2026, 12, 3, 2, 0)
    assert describe_wait(window, check).startswith(
        "waiting for the promotion window 02:00-05:00 UTC on mon,tue,wed,thu,fri, "
        "opens in 3 h 12 min"
    )
    assert not check_window(window, utc(2026, 12, 3, 5, 0)).open


def test_a_friday_evening_waits_for_monday() -> None:
    check = check_window(PromotionWindow(**WEEKDAYS), utc(2026, 12, 4, 6, 0))  # Friday 06:00
    assert check.opens_at == utc(2026, 12, 7, 2, 0)  # Monday
    assert check.wait_s == timedelta(days=2, hours=20).total_seconds()


def test_a_window_across_midnight_belongs_to_the_day_it_opens() -> None:
    window = PromotionWindow(days=["fri"], start="22:00", end="02:00")
    assert check_window(window, utc(2026, 12, 5, 1, 0)).open  # Saturday 01:00, Friday's window
    later = check_window(window, utc(2026, 12, 5, 3, 0))
    assert not later.open and later.opens_at == utc(2026, 12, 11, 22, 0)


def test_until_midnight() -> None:
    window = PromotionWindow(start="00:00", end="24:00")
    check = check_window(window, utc(2026, 12, 5, 23, 59))
    assert check.open and check.closes_at == utc(2026, 12, 6, 0, 0)


def test_the_zone_sets_the_offset() -> None:
    window = PromotionWindow(start="02:00", end="05:00", timezone="America/New_York")
    check = check_window(window, utc(2026, 12, 2, 6, 0))  # 01:00 EST
    assert check.opens_at == utc(2026, 12, 2, 7, 0)
    summer = check_window(window, utc(2026, 7, 1, 6, 0))  # 02:00 EDT: open
    assert summer.open and summer.closes_at == utc(2026, 7, 1, 9, 0)


def test_spring_forward_shortens_a_window_in_the_skipped_hour() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    window = PromotionWindow(start="02:30", end="04:00", timezone="Europe/Berlin")
    check = check_window(window, utc(2026, 3, 29, 0, 10))  # 01:10 CET
    assert check.opens_at == utc(2026, 3, 29, 1, 0)  # the change itself: 03:00 CEST
    assert check.closes_at == utc(2026, 3, 29, 2, 0)  # 04:00 CEST


def test_a_window_inside_the_skipped_hour_does_not_open_that_night() -> None:
    window = PromotionWindow(start="02:00", end="03:00", timezone="Europe/Berlin")
    check = check_window(window, utc(2026, 3, 28, 23, 0))  # Saturday, 00:00 CET
    assert check.opens_at == utc(2026, 3, 30, 0, 0)  # Monday 02:00 CEST


def test_fall_back_keeps_the_repeated_hour_in_the_window() -> None:
    # Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET (01:00 UTC).
    window = PromotionWindow(start="02:00", end="03:00", timezone="Europe/Berlin")
    check = check_window(window, utc(2026, 10, 24, 23, 0))  # 01:00 CEST
    assert check.opens_at == utc(2026, 10, 25, 0, 0)  # first 02:00 (CEST)
    assert check.closes_at == utc(2026, 10, 25, 2, 0)  # 03:00 CET: two hours long
    assert check_window(window, utc(2026, 10, 25, 1, 30)).open  # the second 02:30 (CET)


def test_naive_clocks_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        check_window(PromotionWindow(**WEEKDAYS), datetime(2026, 12, 2, 3, 0))
