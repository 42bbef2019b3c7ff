"""The business-time calculator (services/routing/business_time.py): weekends, holidays, time zones, DST."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.contracts.catalog import Department
from services.routing.business_time import BusinessCalendar, NoBusinessTime

pytestmark = pytest.mark.unit

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")


def dept(**fields: object) -> Department:
    return Department.model_validate({"slug": "it", "name": "IT", **fields})


IT = BusinessCalendar.of(
    dept(
        timezone="Europe/Paris",
        business_hours={"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:30", "end": "18:00"},
        holidays=["2026-12-25", "2027-01-01"],
    )
)
LEGAL = BusinessCalendar.of(
    dept(
        timezone="America/New_York",
        business_hours={"start": "09:00", "end": "18:00"},
        holidays=["2026-11-26", "2026-12-25"],
    )
)
VENDOR = BusinessCalendar.of(
    dept(
        timezone="Asia/Kolkata",
        business_hours={"days": ["mon", "tue", "wed", "thu", "fri", "sat"], "start": "09:00", "end": "18:00"},
    )
)


def local(zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone)


def test_within_one_working_day() -> None:
    start = local(PARIS, 2026, 11, 24, 9, 0)  # Tuesday
    assert IT.add(start, timedelta(hours=4)) == local(PARIS, 2026, 11, 24, 13, 0)
    assert IT.add(start, timedelta(hours=4)).tzinfo is UTC


def test_across_a_weekend() -> None:
    friday_5pm = local(PARIS, 2026, 11, 27, 17, 0)
    # One working hour left on Friday, three more from Monday 08:30.
    deadline = IT.add(friday_5pm, timedelta(hours=4))
    assert deadline == local(PARIS, 2026, 11, 30, 11, 30)
    assert deadline == datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
    assert IT.elapsed(friday_5pm, deadline) == timedelta(hours=4)
    saturday, sunday_night = local(PARIS, 2026, 11, 28, 10, 0), local(PARIS, 2026, 11, 29, 23, 0)
    assert IT.elapsed(saturday, sunday_night) == timedelta(0)


def test_across_a_holiday_and_a_weekend() -> None:
    christmas_eve_5pm = local(PARIS, 2026, 12, 24, 17, 0)  # Thursday; Friday 25th is a holiday
    assert IT.add(christmas_eve_5pm, timedelta(hours=4)) == local(PARIS, 2026, 12, 28, 11, 30)
    assert IT.elapsed(local(PARIS, 2026, 12, 25, 0, 0), local(PARIS, 2026, 12, 26, 0, 0)) == timedelta(0)


def test_a_start_outside_business_hours_waits_for_the_next_opening() -> None:
    saturday = local(PARIS, 2026, 11, 28, 12, 0)
    assert IT.add(saturday, timedelta(minutes=15)) == local(PARIS, 2026, 11, 30, 8, 45)
    before_opening = local(PARIS, 2026, 11, 24, 6, 0)
    assert IT.add(before_opening, timedelta(hours=1)) == local(PARIS, 2026, 11, 24, 9, 30)
    after_closing = local(PARIS, 2026, 11, 24, 19, 0)
    assert IT.add(after_closing, timedelta(hours=1)) == local(PARIS, 2026, 11, 25, 9, 30)


def test_days_of_business_time_span_working_days_not_calendar_days() -> None:
    # "1d" of SLA is 24 business hours: 9.5 h a day at IT, so it ends on the third working day.
    monday_9 = local(PARIS, 2026, 11, 23, 9, 0)
    assert IT.add(monday_9, timedelta(days=1)) == local(PARIS, 2026, 11, 25, 14, 0)


def test_the_providers_time_zone_and_holidays_apply() -> None:
    # Legal works 09:00-18:00 New York time; Thanksgiving (Thursday 26 Nov 2026) is a holiday.
    wednesday_5pm_ny = local(NEW_YORK, 2026, 11, 25, 17, 0)
    deadline = LEGAL.add(wednesday_5pm_ny, timedelta(hours=2))
    assert deadline == local(NEW_YORK, 2026, 11, 27, 10, 0)
    assert deadline == datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
    # The same instant seen from Paris (23:00) changes nothing: the provider's zone decides.
    assert LEGAL.add(wednesday_5pm_ny.astimezone(PARIS), timedelta(hours=2)) == deadline


def test_a_vendor_working_saturdays_in_another_zone() -> None:
    friday_5pm_ist = local(KOLKATA, 2026, 11, 27, 17, 0)
    assert VENDOR.add(friday_5pm_ist, timedelta(hours=2)) == local(KOLKATA, 2026, 11, 28, 10, 0)  # Saturday


def test_daylight_saving_change_inside_business_hours_and_around_the_clock() -> None:
    # Paris leaves summer time on Sunday 25 October 2026.
    friday_4pm = local(PARIS, 2026, 10, 23, 16, 0)  # CEST, UTC+2
    deadline = IT.add(friday_4pm, timedelta(hours=3))  # 2 h on Friday, 1 h on Monday (CET, UTC+1)
    assert deadline == local(PARIS, 2026, 10, 26, 9, 30)
    assert deadline == datetime(2026, 10, 26, 8, 30, tzinfo=UTC)
    always = BusinessCalendar.of(dept(timezone="Europe/Paris", business_hours={"always": True}))
    day = always.elapsed(local(PARIS, 2026, 10, 25, 0, 0), local(PARIS, 2026, 10, 26, 0, 0))
    assert day == timedelta(hours=25)  # the change day really is 25 hours long


def test_around_the_clock_is_wall_clock_time_except_holidays() -> None:
    always = BusinessCalendar.of(dept(business_hours={"always": True}, holidays=["2026-12-25"]))
    start = datetime(2026, 12, 24, 23, 0, tzinfo=UTC)
    assert always.add(start, timedelta(hours=2)) == datetime(2026, 12, 26, 1, 0, tzinfo=UTC)
    plain = BusinessCalendar.around_the_clock()
    assert plain.add(start, timedelta(seconds=3)) == start + timedelta(seconds=3)
    assert plain.elapsed(start, start + timedelta(days=3)) == timedelta(days=3)


def test_zero_negative_and_reversed_amounts() -> None:
    start = local(PARIS, 2026, 11, 28, 12, 0)  # a Saturday
    assert IT.add(start, timedelta(0)) == start
    assert IT.add(start, timedelta(hours=-1)) == start
    assert IT.elapsed(start, start - timedelta(hours=5)) == timedelta(0)


def test_is_open() -> None:
    assert IT.is_open(local(PARIS, 2026, 11, 24, 9, 0))
    assert not IT.is_open(local(PARIS, 2026, 11, 24, 18, 0))  # the end is exclusive
    assert not IT.is_open(local(PARIS, 2026, 11, 28, 12, 0))
    assert not IT.is_open(local(PARIS, 2026, 12, 25, 12, 0))


def test_a_calendar_without_working_time_cannot_give_a_deadline() -> None:
    never = BusinessCalendar(ZoneInfo("UTC"), frozenset(), time(9), time(17), False, frozenset())
    with pytest.raises(NoBusinessTime):
        never.add(datetime(2026, 1, 1, tzinfo=UTC), timedelta(minutes=1))
    assert never.elapsed(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)) == timedelta(0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        IT.add(datetime(2026, 11, 24, 9, 0), timedelta(hours=1))


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)),
    minutes=st.integers(min_value=0, max_value=60 * 24 * 20),
    calendar=st.sampled_from([IT, LEGAL, VENDOR]),
)
def test_elapsed_undoes_add(start: datetime, minutes: int, calendar: BusinessCalendar) -> None:
    amount = timedelta(minutes=minutes)
    end = calendar.add(start, amount)
    assert end >= start
    assert calendar.elapsed(start, end) == amount
    if minutes:
        assert calendar.is_open(end - timedelta(microseconds=1))


def test_holidays_are_local_dates() -> None:
    assert date(2026, 11, 26) in LEGAL.holidays
    # 26 Nov 03:00 UTC is still 25 Nov in New York: a working evening hour? No: 22:00 is after hours.
    assert not LEGAL.is_open(datetime(2026, 11, 26, 3, 0, tzinfo=UTC))
    assert LEGAL.is_open(datetime(2026, 11, 25, 22, 0, tzinfo=UTC))  # 17:00 in New York on Wednesday
