"""Create or update every JetStream stream and durable consumer Baton uses; the only place that does.

A thin mapping from the plain-data specifications in :mod:`libs.contracts.subjects`
to nats-py ``StreamConfig`` / ``ConsumerConfig``. Idempotent: each object is read
first, then created when missing, updated when it differs from its spec, and
otherwise left alone; the report says which. Services attach with ``declare=False``.

Server behaviour this module relies on (nats-server 2.15):

- with a ``backoff`` list the server replaces ``ack_wait`` by ``backoff[0]``; we send
  exactly that so that the stored config equals the one we ask for;
- ``len(backoff) <= max_deliver`` (when ``max_deliver`` is positive), else error 10116;
- ``deliver_policy`` and ``storage`` cannot be changed on an existing object: such a drift is
  reported as a :class:`ProvisionError` naming the object, never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from typing import Any, Literal

import nats
from nats.aio.client import Client as NATS
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.manager import JetStreamManager

from libs.contracts.catalog import Catalog
from libs.contracts.subjects import (
    LEASE_BUCKET,
    LEASE_TTL_SECONDS,
    SERVICE_CONSUMERS,
    STREAMS,
    ConsumerSpec,
    StreamSpec,
    department_consumer_spec,
)

#: JetStream error code of "stream name already in use with a different configuration".
ERR_STREAM_NAME_IN_USE = 10058

STREAM_FIELDS = (
    "description",
    "subjects",
    "retention",
    "discard",
    "storage",
    "max_age",
    "duplicate_window",
    "max_msg_size",
    "num_replicas",
    "deny_delete",
    "deny_purge",
    "allow_msg_schedules",
    "allow_msg_ttl",
)
#: Fields whose desired value ``None`` means "don't care" (the server's default is left alone).
OPTIONAL_FIELDS = frozenset({"description", "allow_msg_schedules", "allow_msg_ttl"})
CONSUMER_FIELDS = (
    "description",
    "deliver_policy",
    "ack_policy",
    "filter_subject",
    "filter_subjects",
    "max_deliver",
    "ack_wait",
    "max_ack_pending",
    "backoff",
)


class ProvisionError(RuntimeError):
    """A spec is invalid, or the server refused to create or update an object."""


class Action(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Item:
    """What provisioning did (or, in a dry run, would do) to one object."""

    kind: Literal["stream", "consumer"]
    name: str  # "BATON_IN" or "BATON_IN/intake"
    action: Action
    changed: tuple[str, ...] = ()  # the fields that differed, for UPDATED

    def __str__(self) -> str:
        extra = f" ({', '.join(self.changed)})" if self.changed else ""
        return f"{self.kind} {self.name}: {self.action}{extra}"


@dataclass
class ProvisionReport:
    items: list[Item] = field(default_factory=list)
    #: Consumers found on Baton's streams that no spec names (e.g. a department removed from the catalog).
    #: Reported, never deleted.
    unknown_consumers: list[str] = field(default_factory=list)
    dry_run: bool = False

    def _named(self, action: Action) -> list[str]:
        return [f"{i.kind} {i.name}" for i in self.items if i.action is action]

    @property
    def created(self) -> list[str]:
        return self._named(Action.CREATED)

    @property
    def updated(self) -> list[str]:
        return self._named(Action.UPDATED)

    @property
    def unchanged(self) -> list[str]:
        return self._named(Action.UNCHANGED)

    @property
    def changed(self) -> bool:
        return any(i.action is not Action.UNCHANGED for i in self.items)

    def __str__(self) -> str:
        lines = [str(i) for i in self.items]
        lines += [f"consumer {name}: not in any spec (left alone)" for name in self.unknown_consumers]
        counts = f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged"
        return "\n".join([*lines, counts + (" (dry run: nothing applied)" if self.dry_run else "")])


# --- spec -> nats-py config ---------------------------------------------------------
def stream_config(spec: StreamSpec, *, num_replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        max_age=spec.max_age_seconds,  # 0 = keep forever
        duplicate_window=spec.duplicate_window_seconds,
        max_msg_size=spec.max_msg_size,
        num_replicas=num_replicas,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        # Only streams that need them ask for these (nats-server 2.12+); None leaves other streams untouched.
        allow_msg_schedules=True if spec.allow_msg_schedules else None,
        allow_msg_ttl=True if spec.allow_msg_ttl else None,
    )


def check_consumer_spec(spec: ConsumerSpec) -> None:
    """Refuse what the server would refuse, with the consumer's name in the message."""
    where = f"consumer {spec.stream}/{spec.durable}"
    if spec.max_deliver == 0 or spec.max_deliver < -1:
        raise ProvisionError(f"{where}: max_deliver must be positive or -1 (unlimited), not {spec.max_deliver}")
    if spec.max_deliver > 0 and len(spec.backoff_seconds) > spec.max_deliver:
        raise ProvisionError(
            f"{where}: {len(spec.backoff_seconds)} backoff values but max_deliver={spec.max_deliver}; "
            "JetStream requires len(backoff) <= max_deliver"
        )
    if any(b <= 0 for b in spec.backoff_seconds):
        raise ProvisionError(f"{where}: backoff values must be positive seconds, got {spec.backoff_seconds}")


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    check_consumer_spec(spec)
    backoff = list(spec.backoff_seconds)
    filters = list(spec.filter_subjects)
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        description=spec.description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        max_deliver=spec.max_deliver,
        # With a backoff list the server stores ack_wait = backoff[0] (ack_wait_seconds is ignored).
        ack_wait=backoff[0] if backoff else spec.ack_wait_seconds,
        max_ack_pending=spec.max_ack_pending,
        backoff=backoff or None,
    )


#: Per-consumer changes to the specs, keyed by durable name: e.g. ``{"intake": {"max_deliver": 4}}``.
ConsumerOverrides = Mapping[str, Mapping[str, Any]]


def consumer_specs(
    catalog: Catalog | None = None, overrides: ConsumerOverrides | None = None
) -> tuple[ConsumerSpec, ...]:
    """The service consumers, then one notification consumer per catalog department.

    ``overrides`` replaces spec fields per durable (tests use a small ``max_deliver`` / ``ack_wait_seconds``);
    an unknown durable or field is a :class:`ProvisionError`.
    """
    departments = catalog.slugs if catalog else []
    specs = SERVICE_CONSUMERS + tuple(department_consumer_spec(slug) for slug in departments)
    if not overrides:
        return specs
    by_name = {s.durable for s in specs}
    allowed = {f.name for f in fields(ConsumerSpec)} - {"stream", "durable"}
    for durable, changes in overrides.items():
        if durable not in by_name:
            raise ProvisionError(f"override for unknown consumer {durable!r}")
        if bad := set(changes) - allowed:
            raise ProvisionError(f"override for consumer {durable!r}: unknown fields {sorted(bad)}")
    return tuple(replace(s, **overrides[s.durable]) if s.durable in overrides else s for s in specs)


# --- comparison -----------------------------------------------------------------------
def _normal(value: Any) -> Any:
    if isinstance(value, Enum):  # nats-py enums are (str, Enum); the server answers plain strings
        return value.value
    if value is None or value == []:
        return None
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _same(desired: Any, actual: Any) -> bool:
    a, b = _normal(desired), _normal(actual)
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def diff(
    desired: StreamConfig | ConsumerConfig, actual: StreamConfig | ConsumerConfig, fields: Sequence[str]
) -> tuple[str, ...]:
    """The fields whose desired value differs from the server's (``None`` in an ``OPTIONAL_FIELDS`` = don't care)."""
    return tuple(
        name
        for name in fields
        if not (name in OPTIONAL_FIELDS and getattr(desired, name) is None)
        and not _same(getattr(desired, name), getattr(actual, name))
    )


def _refused(what: str, verb: str, exc: APIError) -> ProvisionError:
    return ProvisionError(
        f"{what}: the server refused to {verb} it: {exc.description} (code {exc.code}, err_code {exc.err_code})"
    )


# --- the work -----------------------------------------------------------------------------
async def ensure_stream(jsm: JetStreamManager, config: StreamConfig, *, dry_run: bool = False) -> Item:
    name = str(config.name)
    what = f"stream {name}"
    try:
        current = (await jsm.stream_info(name)).config
    except NotFoundError:
        if dry_run:
            return Item("stream", name, Action.CREATED)
        try:
            await jsm.add_stream(config)
            return Item("stream", name, Action.CREATED)
        except APIError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:  # else: created concurrently, fall through to update
                raise _refused(what, "create", exc) from exc
            current = (await jsm.stream_info(name)).config
    changed = diff(config, current, STREAM_FIELDS)
    if not changed:
        return Item("stream", name, Action.UNCHANGED)
    if not dry_run:
        try:
            await jsm.update_stream(config)
        except APIError as exc:
            raise _refused(f"{what} ({', '.join(changed)} changed)", "update", exc) from exc
    return Item("stream", name, Action.UPDATED, changed)


async def ensure_consumer(jsm: JetStreamManager, stream: str, config: ConsumerConfig, *, dry_run: bool = False) -> Item:
    durable = str(config.durable_name)
    name = f"{stream}/{durable}"
    try:
        current: ConsumerConfig | None = (await jsm.consumer_info(stream, durable)).config
    except NotFoundError:
        current = None
    changed = () if current is None else diff(config, current, CONSUMER_FIELDS)
    if current is not None and not changed:
        return Item("consumer", name, Action.UNCHANGED)
    if not dry_run:
        # The modern CONSUMER.CREATE API without an "action" creates or updates.
        try:
            await jsm.add_consumer(stream, config)
        except APIError as exc:
            verb = "create" if current is None else f"update ({', '.join(changed)} changed)"
            raise _refused(f"consumer {name}", verb, exc) from exc
    return Item("consumer", name, Action.CREATED if current is None else Action.UPDATED, changed)


async def ensure_lease_bucket(
    nc: NATS, *, ttl: float = LEASE_TTL_SECONDS, num_replicas: int = 1, dry_run: bool = False, api_timeout: float = 5.0
) -> Item:
    """The key-value bucket of consumer leases (``LEASE_BUCKET``: history 1, ``max_age`` = the lease TTL)."""
    js = nc.jetstream(timeout=api_timeout)
    name = f"KV_{LEASE_BUCKET}"
    try:
        status = await js.key_value(LEASE_BUCKET)
        info = (await status.status()).stream_info.config
    except (NotFoundError, BucketNotFoundError):
        if not dry_run:
            try:
                await js.create_key_value(
                    KeyValueConfig(
                        bucket=LEASE_BUCKET, history=1, ttl=ttl, replicas=num_replicas, storage=StorageType.FILE
                    )
                )
            except APIError as exc:
                raise _refused(f"key-value bucket {LEASE_BUCKET}", "create", exc) from exc
        return Item("stream", name, Action.CREATED)
    changed = tuple(
        n
        for n, want, have in (("max_age", ttl, info.max_age), ("num_replicas", num_replicas, info.num_replicas))
        if not _same(want, have)
    )
    if not changed:
        return Item("stream", name, Action.UNCHANGED)
    if not dry_run:
        info.max_age, info.num_replicas = ttl, num_replicas
        try:
            await js.update_stream(info)
        except APIError as exc:
            raise _refused(f"key-value bucket {LEASE_BUCKET} ({', '.join(changed)} changed)", "update", exc) from exc
    return Item("stream", name, Action.UPDATED, changed)


async def _unknown_consumers(jsm: JetStreamManager, specs: Iterable[ConsumerSpec]) -> list[str]:
    known = {(s.stream, s.durable) for s in specs}
    found: list[str] = []
    for stream in STREAMS:
        try:
            infos = await jsm.consumers_info(stream.name)
        except NotFoundError:
            continue
        found += [f"{stream.name}/{i.name}" for i in infos if (stream.name, i.name) not in known]
    return sorted(found)


async def provision(
    nc_or_url: NATS | str,
    catalog: Catalog | None = None,
    *,
    num_replicas: int = 1,
    dry_run: bool = False,
    api_timeout: float = 5.0,
    overrides: ConsumerOverrides | None = None,
    connect_options: dict[str, Any] | None = None,
    lease_ttl: float = LEASE_TTL_SECONDS,
) -> ProvisionReport:
    """Create or update every stream in ``STREAMS`` and every consumer in ``SERVICE_CONSUMERS``,
    plus one notification consumer per catalog department. Running it twice changes nothing.

    ``nc_or_url``: a connected client (left open) or a server URL (connected and closed here).
    ``dry_run``: compute the report without changing anything. ``api_timeout``: per JetStream API request.
    ``overrides``: per-durable spec changes (see :func:`consumer_specs`).
    ``connect_options``: nats-py ``connect`` keywords (the admin credential, TLS) when given a URL.
    ``lease_ttl``: the TTL of the consumer-lease bucket (how soon a standby intake replica takes over).
    """
    specs = consumer_specs(catalog, overrides)
    configs = [(spec.stream, consumer_config(spec)) for spec in specs]  # validate every spec before any change
    own = isinstance(nc_or_url, str)
    if isinstance(nc_or_url, str):
        nc = await nats.connect(
            nc_or_url,
            name="baton-provision",
            connect_timeout=api_timeout,
            allow_reconnect=False,
            **(connect_options or {}),
        )
    else:
        nc = nc_or_url
    try:
        jsm = nc.jsm(timeout=api_timeout)
        report = ProvisionReport(dry_run=dry_run)
        for stream_spec in STREAMS:
            report.items.append(
                await ensure_stream(jsm, stream_config(stream_spec, num_replicas=num_replicas), dry_run=dry_run)
            )
        for stream, config in configs:
            report.items.append(await ensure_consumer(jsm, stream, config, dry_run=dry_run))
        report.items.append(
            await ensure_lease_bucket(
                nc, ttl=lease_ttl, num_replicas=num_replicas, dry_run=dry_run, api_timeout=api_timeout
            )
        )
        report.unknown_consumers = await _unknown_consumers(jsm, specs)
        return report
    finally:
        if own:
            await nc.close()
