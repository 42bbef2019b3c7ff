"""Every subject, stream and durable consumer name Baton uses, in one module.

Builders validate every token they put into a subject: a subject is never built
from unchecked input. Stream and consumer *specifications* live here as plain
data; ``baton provision`` turns them into JetStream objects (the only place that
creates streams or consumers). Services attach with ``declare=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .envelope import EVENT_TYPE_RE, ID_RE, SLUG_RE

# --- streams -----------------------------------------------------------------
STREAM_IN = "BATON_IN"
STREAM_EVENTS = "BATON_EVENTS"
STREAM_NOTIFY = "BATON_NOTIFY"
STREAM_DLQ = "BATON_DLQ"
STREAM_TIMERS = "BATON_TIMERS"
#: JetStream's max-deliveries and terminated advisories for Baton's service consumers (see docs/reliability.md).
STREAM_ADVISORIES = "BATON_ADVISORIES"

# --- subject prefixes ----------------------------------------------------------
INBOUND_PREFIX = "baton.in"  # baton.in.<dept>.<type>        (line-of-business systems)
SERVICE_PREFIX = "baton.svc"  # baton.svc.<service>.<type>    (events Baton's services emit)
EVENTS_PREFIX = "baton.events"  # baton.events.<request_id>.<type>  (canonical log, written by intake)
NOTIFY_PREFIX = "baton.notify"  # baton.notify.<dept>.<type>
DLQ_PREFIX = "baton.dlq"  # baton.dlq.<service>.<code>
DLQ_REPLAY_PREFIX = f"{DLQ_PREFIX}.replay"  # baton.dlq.replay.<dlq sequence>  (replay records, `baton dlq replay`)
#: Core-NATS advisories JetStream publishes (not persisted unless a stream captures them).
ADVISORY_MAX_DELIVERIES_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ADVISORY_TERMINATED_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED"
#: Routing's durable SLA timers (JetStream message schedules): a schedule is held on
#: baton.timers.sched.<request_id>.<dept>.<clock>.<episode>.<kind> and, at its time, the server
#: publishes it to baton.timers.due.<same tokens>, which routing consumes. Internal to routing.
TIMERS_PREFIX = "baton.timers"
TIMER_SCHEDULE_PREFIX = f"{TIMERS_PREFIX}.sched"
TIMER_DUE_PREFIX = f"{TIMERS_PREFIX}.due"
TIMER_CLOCKS = ("accept", "resolve")
TIMER_KINDS = ("warning", "breach")

SERVICES = ("intake", "routing", "notifier", "metrics")

# --- durable consumers ---------------------------------------------------------
CONSUMER_INTAKE = "intake"  # on BATON_IN
CONSUMER_ROUTING = "routing"  # on BATON_EVENTS
CONSUMER_NOTIFIER = "notifier"  # on BATON_EVENTS
CONSUMER_METRICS = "metrics"  # on BATON_EVENTS
CONSUMER_ROUTING_TIMERS = "routing-timers"  # on BATON_TIMERS (baton.timers.due.>)
CONSUMER_ADVISORIES = "advisories"  # on BATON_ADVISORIES (run by intake: advisories -> dead letters)

# --- leases ----------------------------------------------------------------------
#: JetStream key-value bucket of consumer leases (one key per singleton consumer, e.g. ``intake``):
#: history 1, ``max_age`` = the lease TTL. Of several intake replicas only the lease holder consumes
#: BATON_IN (services/intake/lease.py).
LEASE_BUCKET = "baton_leases"
#: Default lease TTL: a standby intake replica takes over at most about this long after the holder died.
LEASE_TTL_SECONDS = 10.0

MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR


class SubjectError(ValueError):
    """A token is not allowed in a subject."""


def _check(kind: str, value: str, pattern_ok: bool) -> str:
    if not pattern_ok:
        raise SubjectError(f"{kind} {value!r} is not allowed in a subject")
    return value


def check_slug(dept: str) -> str:
    return _check("department", dept, isinstance(dept, str) and SLUG_RE.fullmatch(dept) is not None)


def check_event_type(event_type: str) -> str:
    ok = isinstance(event_type, str) and EVENT_TYPE_RE.fullmatch(event_type) is not None
    return _check("event type", event_type, ok)


def check_request_id(request_id: str) -> str:
    return _check("request id", request_id, isinstance(request_id, str) and ID_RE.fullmatch(request_id) is not None)


def check_service(service: str) -> str:
    return _check("service", service, service in SERVICES)


def inbound_subject(dept: str, event_type: str) -> str:
    return f"{INBOUND_PREFIX}.{check_slug(dept)}.{check_event_type(event_type)}"


def service_subject(service: str, event_type: str) -> str:
    return f"{SERVICE_PREFIX}.{check_service(service)}.{check_event_type(event_type)}"


def event_subject(request_id: str, event_type: str) -> str:
    return f"{EVENTS_PREFIX}.{check_request_id(request_id)}.{check_event_type(event_type)}"


def request_events_filter(request_id: str) -> str:
    """All canonical events of one request: ``baton.events.<request_id>.*``."""
    return f"{EVENTS_PREFIX}.{check_request_id(request_id)}.*"


def notify_subject(dept: str, event_type: str) -> str:
    return f"{NOTIFY_PREFIX}.{check_slug(dept)}.{check_event_type(event_type)}"


def notify_filter(dept: str) -> str:
    return f"{NOTIFY_PREFIX}.{check_slug(dept)}.>"


def dlq_subject(service: str, code: str) -> str:
    return f"{DLQ_PREFIX}.{check_service(service)}.{check_event_type(code)}"


def dlq_replay_subject(dlq_sequence: int) -> str:
    """Where ``baton dlq replay`` records that it re-published the entry at ``dlq_sequence``."""
    ok = isinstance(dlq_sequence, int) and not isinstance(dlq_sequence, bool) and dlq_sequence >= 1
    return f"{DLQ_REPLAY_PREFIX}.{_check('dlq sequence', str(dlq_sequence), ok)}"


def _timer_tokens(request_id: str, dept: str, clock: str, episode: int, kind: str) -> str:
    _check("clock", clock, clock in TIMER_CLOCKS)
    _check("timer kind", kind, kind in TIMER_KINDS)
    _check("episode", str(episode), isinstance(episode, int) and not isinstance(episode, bool) and episode >= 1)
    return f"{check_request_id(request_id)}.{check_slug(dept)}.{clock}.{episode}.{kind}"


def timer_schedule_subject(request_id: str, dept: str, clock: str, episode: int, kind: str) -> str:
    """Where routing holds one SLA timer's schedule (one message per subject: publishing again replaces it)."""
    return f"{TIMER_SCHEDULE_PREFIX}.{_timer_tokens(request_id, dept, clock, episode, kind)}"


def timer_due_subject(request_id: str, dept: str, clock: str, episode: int, kind: str) -> str:
    """Where the server publishes that timer when it is due (the schedule's ``Nats-Schedule-Target``)."""
    return f"{TIMER_DUE_PREFIX}.{_timer_tokens(request_id, dept, clock, episode, kind)}"


def department_consumer(dept: str) -> str:
    """Durable consumer name of a department's notification stream."""
    return f"dept-{check_slug(dept)}"


@dataclass(frozen=True)
class ParsedInbound:
    """A dissected inbound subject. ``department``/``event_type`` are None when the token is invalid."""

    source: str  # "department" | "service" | "unknown"
    department: str | None
    service: str | None
    event_type: str | None
    problems: tuple[str, ...] = ()


def parse_inbound_subject(subject: str) -> ParsedInbound:
    """Split ``baton.in.<dept>.<type>`` or ``baton.svc.<service>.<type>``, checking every token."""
    parts = subject.split(".")
    if len(parts) == 4 and ".".join(parts[:2]) == INBOUND_PREFIX:
        dept, event_type = parts[2], parts[3]
        problems = []
        dept_ok = SLUG_RE.fullmatch(dept) is not None
        type_ok = EVENT_TYPE_RE.fullmatch(event_type) is not None
        if not dept_ok:
            problems.append(f"department {dept!r} in the subject is not a valid slug (^[a-z][a-z0-9-]{{1,31}}$)")
        if not type_ok:
            problems.append(f"event type {event_type!r} in the subject is not valid")
        return ParsedInbound(
            "department", dept if dept_ok else None, None, event_type if type_ok else None, tuple(problems)
        )
    if len(parts) == 4 and ".".join(parts[:2]) == SERVICE_PREFIX and parts[2] in SERVICES:
        event_type = parts[3]
        type_ok = EVENT_TYPE_RE.fullmatch(event_type) is not None
        return ParsedInbound(
            "service",
            None,
            parts[2],
            event_type if type_ok else None,
            () if type_ok else (f"event type {event_type!r} in the subject is not valid",),
        )
    prefix_ok = subject.startswith(INBOUND_PREFIX + ".")
    maybe_dept = parts[2] if prefix_ok and len(parts) > 2 and SLUG_RE.fullmatch(parts[2]) else None
    return ParsedInbound(
        "unknown", maybe_dept, None, None, (f"subject {subject!r} is not of the form baton.in.<dept>.<type>",)
    )


# --- stream and consumer specifications -----------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_seconds: float  # 0 = keep forever
    duplicate_window_seconds: float
    max_msg_size: int = 1 << 20
    deny_delete: bool = False
    deny_purge: bool = False
    #: JetStream message schedules (nats-server 2.12+): ``Nats-Schedule`` headers are honoured.
    allow_msg_schedules: bool = False
    #: Per-message TTL (``Nats-TTL``; also what ``Nats-Schedule-TTL`` sets on the messages a schedule produces).
    allow_msg_ttl: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    description: str
    filter_subjects: tuple[str, ...] = ()
    #: Deliveries before a message is dead-lettered. Handlers nak transient failures with an
    #: exponential delay capped at 30 s, so 60 deliveries ride out about 25 minutes of outage.
    max_deliver: int = 60
    #: Redelivery after this long without an ack (a crashed or stuck consumer).
    ack_wait_seconds: float = 15.0
    max_ack_pending: int = 1000
    #: JetStream ``backoff`` (redelivery delays after ack timeouts). When set, the server uses
    #: ``backoff[0]`` as the ack wait, so service consumers leave it empty and their handlers
    #: pick the retry delay themselves with ``nak(delay=...)`` (a plain nak redelivers at once).
    backoff_seconds: tuple[float, ...] = field(default=())


#: The consumers whose give-ups become dead letters through advisories (each durable, with its stream).
_ADVISED_CONSUMERS = (
    (STREAM_IN, CONSUMER_INTAKE),
    (STREAM_EVENTS, CONSUMER_ROUTING),
    (STREAM_EVENTS, CONSUMER_NOTIFIER),
    (STREAM_EVENTS, CONSUMER_METRICS),
    (STREAM_TIMERS, CONSUMER_ROUTING_TIMERS),
)
ADVISORY_SUBJECTS: tuple[str, ...] = tuple(
    f"{prefix}.{stream}.{durable}"
    for stream, durable in _ADVISED_CONSUMERS
    for prefix in (ADVISORY_MAX_DELIVERIES_PREFIX, ADVISORY_TERMINATED_PREFIX)
)

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        STREAM_IN,
        (f"{INBOUND_PREFIX}.>", f"{SERVICE_PREFIX}.>"),
        "Inbound events from departments and from Baton's services, before intake validates them.",
        max_age_seconds=7 * DAY,
        duplicate_window_seconds=20 * MINUTE,
    ),
    StreamSpec(
        STREAM_EVENTS,
        (f"{EVENTS_PREFIX}.>",),
        "The canonical event log: every accepted event, stamped with its per-request sequence.",
        max_age_seconds=0,
        duplicate_window_seconds=20 * MINUTE,
        deny_delete=True,
        deny_purge=True,
    ),
    StreamSpec(
        STREAM_NOTIFY,
        (f"{NOTIFY_PREFIX}.>",),
        "Per-department notification streams.",
        max_age_seconds=30 * DAY,
        duplicate_window_seconds=20 * MINUTE,
    ),
    StreamSpec(
        STREAM_DLQ,
        (f"{DLQ_PREFIX}.>",),
        "Dead letters: refused or undeliverable messages, with the reason and the original payload.",
        max_age_seconds=30 * DAY,
        duplicate_window_seconds=20 * MINUTE,
    ),
    StreamSpec(
        STREAM_TIMERS,
        (f"{TIMERS_PREFIX}.>",),
        "Routing's durable SLA timers: schedules (baton.timers.sched.>) and the due messages they produce "
        "(baton.timers.due.>).",
        # A schedule may wait for weeks (a long SLA, paused clocks): never age it out. Due messages expire
        # through their own TTL (Nats-Schedule-TTL), and routing's database is the truth about every clock.
        max_age_seconds=0,
        duplicate_window_seconds=2 * MINUTE,
        max_msg_size=64 * 1024,
        allow_msg_schedules=True,
        allow_msg_ttl=True,
    ),
    StreamSpec(
        STREAM_ADVISORIES,
        ADVISORY_SUBJECTS,
        "JetStream max-deliveries and terminated advisories of Baton's service consumers; intake turns "
        "each into a dead letter on BATON_DLQ.",
        max_age_seconds=30 * DAY,
        duplicate_window_seconds=2 * MINUTE,
        max_msg_size=64 * 1024,
    ),
)

SERVICE_CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec(STREAM_IN, CONSUMER_INTAKE, "Intake validates inbound events and appends the canonical log."),
    ConsumerSpec(STREAM_EVENTS, CONSUMER_ROUTING, "Routing decides the provider of new requests."),
    ConsumerSpec(STREAM_EVENTS, CONSUMER_NOTIFIER, "Notifier fans events out to department streams."),
    ConsumerSpec(STREAM_EVENTS, CONSUMER_METRICS, "Metrics projects timelines and KPIs."),
    ConsumerSpec(
        STREAM_TIMERS,
        CONSUMER_ROUTING_TIMERS,
        "Routing's due SLA timers (warnings and breaches).",
        filter_subjects=(f"{TIMER_DUE_PREFIX}.>",),
        # A due timer waits while routing catches up on the request's events (nak with a delay): it must
        # never run out of deliveries and be dropped. Routing dead-letters an unreadable one itself.
        max_deliver=-1,
    ),
    ConsumerSpec(
        STREAM_ADVISORIES,
        CONSUMER_ADVISORIES,
        "Intake turns max-deliveries and terminated advisories into dead letters.",
        # An advisory is never dropped: a failure (BATON_DLQ unreachable) is retried with a delay forever.
        max_deliver=-1,
    ),
)


def department_consumer_spec(dept: str) -> ConsumerSpec:
    return ConsumerSpec(
        STREAM_NOTIFY,
        department_consumer(dept),
        f"Notification stream of department {dept}.",
        filter_subjects=(notify_filter(dept),),
        max_deliver=-1,
        backoff_seconds=(),
    )
