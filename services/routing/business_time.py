"""Business time: how much of a department's working time lies between two instants, and when a
given amount of it will have elapsed. Pure functions over a department's calendar.

A department works on its ``business_hours.days`` from ``start`` to ``end`` *local time* in its
``timezone``, except on its ``holidays`` (local dates); ``always: true`` means all day, every day
(holidays still stop the clock). Instants are aware datetimes; results are in UTC.

Local times are turned into instants with ``zoneinfo``, so a working day that spans a daylight
saving change is as long as it really is (a 09:00-17:00 day is 8 real hours either way; an
``always`` day is 23 or 25 hours on the change days). A local start that does not exist (inside
a spring-forward gap) is read with the offset before the change, as ``zoneinfo`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from libs.contracts.catalog import Department, Weekday

_WEEKDAYS = {day: index for index, day in enumerate(Weekday)}  # mon=0 ... sun=6
ZERO = timedelta(0)
#: How far ahead a calculation looks for working time before giving up (a calendar with no
#: working day at all, or holidays covering everything): ten years.
HORIZON_DAYS = 3660


class NoBusinessTime(ValueError):
    """The calendar has no working time within the horizon: a deadline cannot be computed."""


@dataclass(frozen=True)
class BusinessCalendar:
    zone: ZoneInfo
    days: frozenset[int]  # weekday numbers, monday = 0
    start: time
    end: time
    always: bool
    holidays: frozenset[date]

    @classmethod
    def of(cls, department: Department) -> BusinessCalendar:
        hours = department.business_hours
        return cls(
            zone=ZoneInfo(department.timezone),
            days=frozenset(_WEEKDAYS[d] for d in hours.days),
            start=hours.start,
            end=hours.end,
            always=hours.always,
            holidays=frozenset(department.holidays),
        )

    @classmethod
    def around_the_clock(cls, zone: str = "UTC") -> BusinessCalendar:
        """24/7 with no holidays: plain wall-clock time."""
        return cls(ZoneInfo(zone), frozenset(range(7)), time(0), time(0), True, frozenset())

    # --- the working intervals -------------------------------------------------------------
    def _day(self, day: date) -> tuple[datetime, datetime] | None:
        """The working interval of one local date, in UTC (None on a day off)."""
        if day in self.holidays:
            return None
        if self.always:
            opens = datetime.combine(day, time(0), tzinfo=self.zone)
            closes = datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.zone)
        else:
            if day.weekday() not in self.days:
                return None
            opens = datetime.combine(day, self.start, tzinfo=self.zone)
            closes = datetime.combine(day, self.end, tzinfo=self.zone)
        return opens.astimezone(UTC), closes.astimezone(UTC)

    def intervals(self, since: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Working intervals ``[opens, closes)`` in UTC that end after ``since``, in order (at most the horizon)."""
        since = _aware(since)
        day = since.astimezone(self.zone).date() - timedelta(days=1)
        for _ in range(HORIZON_DAYS):
            interval = self._day(day)
            day += timedelta(days=1)
            if interval is not None and interval[1] > since and interval[1] > interval[0]:
                yield interval

    def is_open(self, at: datetime) -> bool:
        at = _aware(at)
        return any(opens <= at < closes for opens, closes in self._first_intervals(at))

    def _first_intervals(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        for opens, closes in self.intervals(at):
            if opens > at:
                return
            yield opens, closes

    # --- the two calculations ----------------------------------------------------------------
    def elapsed(self, start: datetime, end: datetime) -> timedelta:
        """Working time between two instants (zero when ``end`` is not after ``start``)."""
        start, end = _aware(start), _aware(end)
        if end <= start:
            return ZERO
        total = ZERO
        for opens, closes in self.intervals(start):
            if opens >= end:
                break
            total += min(closes, end) - max(opens, start)
        return total

    def add(self, start: datetime, amount: timedelta) -> datetime:
        """The instant at which ``amount`` of working time has elapsed since ``start`` (UTC).

        ``amount`` zero or negative: ``start`` itself. Raises :class:`NoBusinessTime` when the
        calendar has too little working time within the horizon.
        """
        start = _aware(start).astimezone(UTC)
        if amount <= ZERO:
            return start
        left = amount
        for opens, closes in self.intervals(start):
            begin = max(opens, start)
            available = closes - begin
            if left <= available:
                return begin + left
            left -= available
        raise NoBusinessTime(f"less than {amount} of business time within {HORIZON_DAYS} days of {start.isoformat()}")


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()}: business time needs aware instants")
    return value
