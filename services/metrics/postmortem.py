"""Post-mortems: a blameless one-page review of a resolved request that went badly. Pure functions.

A resolved request gets one when it breached an SLA clock, was delayed more than once, or looped
between departments. Everything comes from its events (through its timeline and facts): where the
time went per department, each delay with its reason, what each department committed versus
delivered, the SLA clocks, and the handoff chain.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from .domain import Timeline
from .facts import Clock, RequestFacts, accept_clock, resolve_clock


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class TimeShare(_Out):
    department: str
    role: str
    seconds: float
    share: float


class DelayLine(_Out):
    department: str
    at: datetime
    reason: str
    reason_code: str | None
    blocking_department: str | None
    previous_eta: datetime | None
    new_eta: datetime
    slip_seconds: float | None
    lasted_seconds: float | None


class Commitment(_Out):
    department: str
    via: str
    received_at: datetime
    accepted_at: datetime | None
    first_eta: datetime | None
    last_eta: datetime | None
    delivered_at: datetime | None
    outcome: str
    verdict: str


class ClockLine(_Out):
    department: str
    clock: str
    deadline: datetime | None
    breached: bool
    escalated: bool


class PostMortem(_Out):
    request_id: str
    title: str | None
    requester: str | None
    created_at: datetime | None
    resolved_at: datetime | None
    why: list[str]
    time_per_department: list[TimeShare]
    delays: list[DelayLine]
    commitments: list[Commitment]
    clocks: list[ClockLine]
    chain: list[str]
    loops: list[str]
    feedback: str | None


def _clocks(facts: RequestFacts, now: datetime) -> list[Clock]:
    out: list[Clock] = []
    for stint in facts.stints:
        for clock in (accept_clock(stint, now), resolve_clock(stint, now)):
            if clock is not None:
                out.append(clock)
    return out


def reasons(facts: RequestFacts, now: datetime) -> list[str]:
    """Why the request deserves a post-mortem (empty: it does not, or it is not resolved yet)."""
    if facts.first_resolved_at is None or facts.state not in {"resolved", "closed"}:
        return []
    why = [
        f"{c.department} breached its {c.clock} SLA" + (" (escalated)" if c.escalated else "")
        for c in _clocks(facts, now)
        if c.breached
    ]
    delays = sum(len(s.delays) for s in facts.stints)
    if delays > 1:
        why.append(f"delayed {delays} times")
    if facts.loops:
        why.append(f"handoff loop detected ({', '.join(sorted({lp.pattern for lp in facts.loops}))})")
    return why


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes:02d}m" if days else f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def _verdict(delivered: datetime | None, first: datetime | None, last: datetime | None, outcome: str) -> str:
    if delivered is None:
        return outcome
    if first is None:
        return "delivered without a committed ETA"
    if delivered <= first:
        return "delivered by the first ETA"
    late = _duration((delivered - first).total_seconds())
    if last is not None and delivered <= last:
        return f"delivered {late} after the first ETA, by the last one"
    return f"delivered {late} after the first ETA, and after the last one"


def build_postmortem(timeline: Timeline, facts: RequestFacts, now: datetime) -> PostMortem | None:
    why = reasons(facts, now)
    if not why:
        return None
    per: dict[tuple[str, str], float] = {}
    for hold in timeline.holds:
        key = (hold.department, hold.role.value)
        per[key] = per.get(key, 0.0) + hold.seconds
    total = sum(per.values()) or 1.0
    shares = [
        TimeShare(department=d, role=r, seconds=s, share=s / total)
        for (d, r), s in sorted(per.items(), key=lambda kv: -kv[1])
    ]
    delays = [
        DelayLine(
            department=s.department,
            at=d.at,
            reason=d.reason,
            reason_code=d.reason_code,
            blocking_department=d.blocking_department,
            previous_eta=d.previous_eta,
            new_eta=d.new_eta,
            slip_seconds=(d.new_eta - d.previous_eta).total_seconds() if d.previous_eta else None,
            lasted_seconds=(d.until - d.at).total_seconds() if d.until else None,
        )
        for s in facts.stints
        for d in s.delays
    ]
    commitments = []
    for s in facts.stints:
        delivered = s.end if s.end_kind == "resolved" else None
        outcome = (
            f"resolved ({s.outcome})" if s.end_kind == "resolved" else (s.end_kind or "still held").replace("_", " ")
        )
        commitments.append(
            Commitment(
                department=s.department,
                via=s.via,
                received_at=s.start,
                accepted_at=s.accepted_at,
                first_eta=s.first_eta,
                last_eta=s.eta,
                delivered_at=delivered,
                outcome=outcome,
                verdict=_verdict(delivered, s.first_eta, s.eta, outcome),
            )
        )
    chain = [facts.requester or "?"] + [s.department for s in facts.stints]
    feedback = None
    if facts.feedback is not None:
        comment = f": {facts.feedback.comment}" if facts.feedback.comment else ""
        feedback = f"{facts.feedback.rating}/5{comment}"
    return PostMortem(
        request_id=facts.request_id,
        title=facts.title,
        requester=facts.requester,
        created_at=facts.created_at,
        resolved_at=facts.resolved_at or facts.first_resolved_at,
        why=why,
        time_per_department=shares,
        delays=delays,
        commitments=commitments,
        clocks=[
            ClockLine(
                department=c.department, clock=c.clock, deadline=c.deadline, breached=c.breached, escalated=c.escalated
            )
            for c in _clocks(facts, now)
        ],
        chain=chain,
        loops=[f"{lp.pattern}: {' → '.join(lp.chain)}" for lp in facts.loops],
        feedback=feedback,
    )


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md(text: object) -> str:
    """Plain text made safe for a Markdown table cell or line: one line, special characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def to_markdown(pm: PostMortem) -> str:
    out = [
        f"# Post-mortem: {md(pm.request_id)} — {md(pm.title or '')}",
        "",
        f"Raised by **{md(pm.requester)}** on {_when(pm.created_at)}, resolved on {_when(pm.resolved_at)}.",
        "This review is generated from the request's events. It describes what happened, not who is to blame.",
        "",
        "## Why this review",
        "",
        *(f"- {md(w)}" for w in pm.why),
        "",
        "## Handoff chain",
        "",
        " → ".join(md(d) for d in pm.chain),
        "",
        *(f"- loop: {md(lp)}" for lp in pm.loops),
        "",
        "## Where the time went",
        "",
        "| Department | Role | Time | Share |",
        "|---|---|---|---|",
        *(
            f"| {md(t.department)} | {t.role} | {_duration(t.seconds)} | {t.share:.0%} |"
            for t in pm.time_per_department
        ),
        "",
        "## Delays",
        "",
    ]
    if pm.delays:
        out += [
            "| When | Department | Reason | Code | Blocking | ETA moved | Lasted |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in pm.delays:
            moved = f"{_when(d.previous_eta)} → {_when(d.new_eta)}"
            lasted = _duration(d.lasted_seconds) if d.lasted_seconds is not None else "—"
            out.append(
                f"| {_when(d.at)} | {md(d.department)} | {md(d.reason)} | {d.reason_code or '—'} | "
                f"{md(d.blocking_department or '—')} | {moved} | {lasted} |"
            )
    else:
        out.append("No delays.")
    out += [
        "",
        "## Committed versus delivered",
        "",
        "| Department | Received | Accepted | First ETA | Last ETA | Delivered | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in pm.commitments:
        out.append(
            f"| {md(c.department)} ({c.via}) | {_when(c.received_at)} | {_when(c.accepted_at)} | "
            f"{_when(c.first_eta)} | {_when(c.last_eta)} | {_when(c.delivered_at)} | {md(c.verdict)} |"
        )
    out += ["", "## SLA clocks", "", "| Department | Clock | Deadline | Result |", "|---|---|---|---|"]
    for k in pm.clocks:
        result = ("breached, escalated" if k.escalated else "breached") if k.breached else "met or running"
        out.append(f"| {md(k.department)} | {k.clock} | {_when(k.deadline)} | {result} |")
    if pm.feedback:
        out += ["", "## Feedback", "", md(pm.feedback)]
    return "\n".join(out) + "\n"
