"""``baton bench``: Baton's end-to-end throughput and latency, next to the raw NATS limit measured in the
same run on the same broker.

Phases (each bounded; the whole run takes about ``duration`` seconds plus stack start-up and drains):

1. **raw**: one process measures bare JetStream publish (``publish_async`` with a window), bare consume
   (pull ``fetch`` + ``ack``) and one relay hop (pull ``fetch`` → ``publish_async`` → ``ack``) on two
   scratch streams (``BENCH_RAW_A``/``_B``, deleted afterwards).
2. **fixed rate**: separate publisher processes offer ``rate`` inbound events/s in full lifecycles
   (created → routed → accepted → delayed → resolved → feedback) and record, per event, inbound PubAck →
   first notification carrying that event on its department stream.
3. **saturation**: the same publishers keep ``window`` lifecycles in flight each, as fast as Baton goes.

After phases 2 and 3 the run waits until every durable consumer has acked everything, every published
event has its notification and metrics has projected every canonical event; throughput counts from the
first inbound PubAck of the phase to that point. Only loopback addresses are used.

Publishers are plain nats-py, as a line-of-business system would be. Each owns a disjoint set of
departments (requester and provider both), so it hears exactly its own requests' notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from libs.contracts.subjects import (
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    STREAM_TIMERS,
    inbound_subject,
    notify_filter,
)

from .demo import envelope
from .nats_config import cli_options

#: Department events a bench lifecycle publishes (routing adds ``routed``): 5 inbound, 6 canonical.
INBOUND_TYPES = ("created", "accepted", "delayed", "resolved", "feedback")
CANONICAL_PER_LIFECYCLE = 6
RAW_STREAM_A = "BENCH_RAW_A"
RAW_STREAM_B = "BENCH_RAW_B"
PROJECTED_METRIC = "baton_metrics_events_projected_total"


@dataclass
class BenchConfig:
    duration: float = 60.0
    rate: float = 500.0  # offered inbound events/s in the fixed-rate phase
    publishers: int = 2
    window: int = 25  # lifecycles in flight per publisher at saturation
    nats_url: str | None = None  # target a running stack instead of starting one
    metrics_url: str | None = None
    catalog_path: Path = Path("deploy/catalog.yaml")
    out_dir: Path = Path("bench-results")
    payload_bytes: int = 600  # raw phase message size (about one Baton event)
    drain_timeout: float = 60.0
    #: Embedded stack only: services to run under cProfile (a ``sitecustomize`` hook on PYTHONPATH; no
    #: service code changes). Each writes ``<out_dir>/<timestamp>-<service>.prof`` when it stops.
    profile: tuple[str, ...] = ()
    #: Embedded stack only: copy the services' and nats-server's logs here before the stack is removed.
    keep_logs: Path | None = None
    #: NATS credential file of a running stack (the admin's); the embedded stack uses its own.
    creds: Path | None = None


PROFILE_HOOK = """\
# Written by baton bench --profile: profiles this process when its OTEL_SERVICE_NAME is listed.
# uvicorn re-raises SIGTERM after its graceful shutdown (no atexit then), so the dump also runs there.
import atexit, cProfile, os, signal
_targets = os.environ.get("BATON_BENCH_PROFILE", "").split(",")
_name = os.environ.get("OTEL_SERVICE_NAME", "").removeprefix("baton-")
if _name and _name in _targets:
    _profiler = cProfile.Profile()
    _profiler.enable()
    _raise_signal = signal.raise_signal

    def _dump() -> None:
        _profiler.disable()
        _profiler.dump_stats(os.path.join(os.environ["BATON_BENCH_PROFILE_DIR"], _name + ".prof"))

    def _dump_then_raise(sig: int) -> None:
        _dump()
        _raise_signal(sig)

    signal.raise_signal = _dump_then_raise
    atexit.register(_dump)
"""


def profile_env(hook_dir: Path, out_dir: Path, services: tuple[str, ...]) -> dict[str, str]:
    """Environment that runs ``services`` under cProfile through a ``sitecustomize`` in ``hook_dir``."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(PROFILE_HOOK)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "BATON_BENCH_PROFILE": ",".join(services),
        "BATON_BENCH_PROFILE_DIR": str(out_dir.resolve()),
    }


# --- per-process resource sampling (Linux /proc) -------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (``/proc/<pid>/stat`` fields 14 and 15)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mib(pid: int) -> float | None:
    """Resident memory (``VmRSS`` in ``/proc/<pid>/status``) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ResourceSampler:
    """Samples RSS every ``interval`` seconds and CPU seconds at phase marks, per named process."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        self.pids = pids
        self.interval = interval
        self.rss: dict[str, list[float]] = {name: [] for name in pids}
        #: (seconds since start, RSS MiB) per process: the series behind ``memory_mib.<name>.per_minute``
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def cpu(self) -> dict[str, float | None]:
        return {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                rss = proc_rss_mib(pid)
                if rss is not None:
                    self.rss[name].append(rss)
                    self.series[name].append((time.monotonic() - self._started, rss))
            await asyncio.sleep(self.interval)

    def per_minute(self, name: str) -> list[float]:
        """The largest RSS of each whole or partial minute of the run, in MiB: flat memory shows as a flat list."""
        out: dict[int, float] = {}
        for at, rss in self.series[name]:
            minute = int(at // 60)
            out[minute] = max(out.get(minute, 0.0), rss)
        return [round(out[m], 1) for m in sorted(out)]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def cpu_delta(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        out[name] = None if start is None or end is None else round(end - start, 3)
    return out


# --- statistics ----------------------------------------------------------------------------------------
def percentiles(samples_ms: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean of latencies in milliseconds (nearest-rank), and the sample count."""
    if not samples_ms:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(samples_ms)

    def rank(q: float) -> float:
        index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
        return round(ordered[index], 2)

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[-1], 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


# --- publisher processes -------------------------------------------------------------------------------
def _envelope(event_type: str, request_id: str, dept: str) -> dict[str, Any]:
    return envelope(event_type, request_id, dept, person="Bench")


@dataclass
class _Lifecycle:
    request_id: str
    requester: str
    provider: str
    created_ack: float = 0.0
    routed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PublisherJob:
    nats_url: str
    index: int
    departments: tuple[str, ...]
    categories: tuple[str, ...]  # a category each department serves (explicit providers must serve it)
    seconds: float
    lifecycles_per_s: float = 0.0  # open loop at this rate when > 0
    window: int = 0  # else closed loop with this many lifecycles in flight
    #: Open loop only: a tick that finds this many lifecycles in flight is skipped (counted as ``shed``),
    #: so that a rate Baton cannot sustain shows as a lower achieved rate, not an unbounded backlog.
    max_in_flight: int = 0
    finish_timeout: float = 60.0
    creds: str | None = None  # the admin's credential file (publishes as every department)


class _Publisher:
    def __init__(self, job: PublisherJob) -> None:
        self.job = job
        self.lifecycles: dict[str, _Lifecycle] = {}
        self.ack_at: dict[str, tuple[str, float]] = {}  # event_id -> (type, monotonic PubAck time)
        self.seen_at: dict[str, float] = {}  # event_id -> first notification time
        self.created_to_routed_ms: list[float] = []
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.shed = 0
        self.notifications = 0
        self.last_notification = 0.0
        self.rejected = 0
        self.rejections: list[Any] = []
        self.js: Any = None

    async def on_notification(self, msg: Any) -> None:
        now = time.monotonic()
        note = orjson.loads(msg.data)
        if msg.subject.endswith(".rejected"):
            self.rejected += 1
            if len(self.rejections) < 3:
                self.rejections.append(note)
            return
        life = self.lifecycles.get(note.get("request_id", ""))
        if life is None:
            return
        self.notifications += 1
        self.last_notification = now
        event_id = note["event"]["event_id"]
        self.seen_at.setdefault(event_id, now)
        if note["type"] == "routed" and note.get("role") == "provider" and not life.routed.is_set():
            self.created_to_routed_ms.append((now - life.created_ack) * 1000)
            life.routed.set()

    async def publish(self, dept: str, event: dict[str, Any]) -> float:
        await self.js.publish(
            inbound_subject(dept, event["type"]),
            orjson.dumps(event),
            stream=STREAM_IN,
            headers={"Nats-Msg-Id": event["event_id"]},
            timeout=30,
        )
        acked = time.monotonic()
        self.ack_at[event["event_id"]] = (event["type"], acked)
        return acked

    async def lifecycle(self, requester: str, provider: str, category: str) -> None:
        request_id = f"BENCH-{uuid.uuid4().hex[:16]}"
        life = _Lifecycle(request_id, requester, provider)
        self.lifecycles[request_id] = life
        self.started += 1
        created = _envelope("created", request_id, requester) | {
            "title": "Bench request",
            "description": "Published by baton bench.",
            "category": category,
            "priority": "normal",
            "requester": {"department": requester, "person": "Bench"},
            "provider_department": provider,
        }
        try:
            life.created_ack = await self.publish(requester, created)
            # The provider reacts to its routed notification, as a real one would (and as intake requires).
            await asyncio.wait_for(life.routed.wait(), self.job.finish_timeout)
            eta = datetime.now(UTC) + timedelta(days=1)
            await self.publish(
                provider, _envelope("accepted", request_id, provider) | {"assignee": "Bench", "eta": eta.isoformat()}
            )
            delayed = {"reason": "bench", "new_eta": (eta + timedelta(days=1)).isoformat(), "reason_code": "capacity"}
            await self.publish(provider, _envelope("delayed", request_id, provider) | delayed)
            resolved = {"resolution": "Done by the bench.", "outcome": "done"}
            await self.publish(provider, _envelope("resolved", request_id, provider) | resolved)
            await self.publish(requester, _envelope("feedback", request_id, requester) | {"rating": 5})
            self.completed += 1
        except Exception:
            self.failed += 1

    async def run(self) -> dict[str, Any]:
        job = self.job
        nc = await nats.connect(
            job.nats_url, name=f"baton-bench-{job.index}", max_reconnect_attempts=-1, **_options(job.creds)
        )
        self.js = nc.jetstream()
        subs = [
            await self.js.subscribe(
                notify_filter(dept),
                stream=STREAM_NOTIFY,
                cb=self.on_notification,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
            for dept in job.departments
        ]
        count = len(job.departments)
        pairs = [
            (d, job.departments[(i + 1) % count], job.categories[(i + 1) % count])
            for i, d in enumerate(job.departments)
        ]
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        end = start + job.seconds
        n = 0
        if job.lifecycles_per_s > 0:
            step = 1.0 / job.lifecycles_per_s
            due = start
            while due < end:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                due += step
                if job.max_in_flight and len(tasks) >= job.max_in_flight:
                    self.shed += 1
                    continue
                task = asyncio.create_task(self.lifecycle(*pairs[n % len(pairs)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
        else:
            slots = asyncio.Semaphore(job.window)
            while time.monotonic() < end:
                await slots.acquire()
                task = asyncio.create_task(self.lifecycle(*pairs[n % len(pairs)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: slots.release())
                n += 1
        if tasks:
            await asyncio.wait(set(tasks), timeout=job.finish_timeout)
        # Wait for the notification of every acked event (bounded).
        limit = time.monotonic() + job.finish_timeout
        while time.monotonic() < limit:
            if all(eid in self.seen_at for eid in self.ack_at):
                break
            await asyncio.sleep(0.05)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
        latencies: dict[str, list[float]] = {t: [] for t in INBOUND_TYPES}
        missing = 0
        for event_id, (event_type, acked) in self.ack_at.items():
            seen = self.seen_at.get(event_id)
            if seen is None:
                missing += 1
            else:
                latencies[event_type].append(max(0.0, seen - acked) * 1000)
        acks = [acked for _, acked in self.ack_at.values()]
        return {
            "started": self.started,
            "completed": self.completed,
            "failed": self.failed,
            "shed": self.shed,
            "events_acked": len(self.ack_at),
            "notifications_without_event": missing,
            "notifications_seen": self.notifications,
            "rejected": self.rejected,
            "rejection_samples": self.rejections,
            "first_ack": min(acks, default=0.0),
            "last_ack": max(acks, default=0.0),
            "last_notification": self.last_notification,
            "latency_ms": latencies,
            "created_to_routed_ms": self.created_to_routed_ms,
        }


def _options(creds: str | None) -> dict[str, Any]:
    """The operator's login: the bench publishes as every department and makes its own streams."""
    return cli_options("admin", "admin", creds=Path(creds) if creds else None)


def run_publisher(job: PublisherJob) -> dict[str, Any]:
    """Entry point of one publisher process."""
    return asyncio.run(_Publisher(job).run())


# --- raw NATS limit --------------------------------------------------------------------------------------
async def _raw_limits(nats_url: str, seconds: float, payload_bytes: int, creds: str | None) -> dict[str, Any]:
    nc = await nats.connect(nats_url, name="baton-bench-raw", **_options(creds))
    js = nc.jetstream(publish_async_max_pending=4000)
    for name in (RAW_STREAM_A, RAW_STREAM_B):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
        subject = f"bench.raw.{name[-1].lower()}"
        await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
    payload = b"x" * payload_bytes
    try:
        # 1. bare publish: publish_async, at most 4000 unacked (the PubAcks are awaited).
        count = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for _ in range(500):
                await js.publish_async("bench.raw.a", payload)
            count += 500
        await js.publish_async_completed()
        publish_rate = count / (time.monotonic() - start)

        # 2. bare consume: pull fetch + ack.
        async def drain(durable: str, relay: bool) -> float:
            sub = await js.pull_subscribe("bench.raw.a", durable=durable, stream=RAW_STREAM_A)
            done = 0
            begin = time.monotonic()
            while time.monotonic() - begin < seconds and done < count:
                try:
                    msgs = await sub.fetch(256 if not relay else 64, timeout=1.0)
                except Exception:
                    break
                if relay:
                    acks = [await js.publish_async("bench.raw.b", m.data) for m in msgs]
                    await asyncio.gather(*acks)
                for m in msgs:
                    await m.ack()
                done += len(msgs)
            rate = done / (time.monotonic() - begin)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            return rate

        consume_rate = await drain("bench-consume", relay=False)
        relay_rate = await drain("bench-relay", relay=True)
    finally:
        for name in (RAW_STREAM_A, RAW_STREAM_B):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()
    return {
        "payload_bytes": payload_bytes,
        "seconds_each": seconds,
        "publish_msgs_per_s": round(publish_rate, 1),
        "consume_msgs_per_s": round(consume_rate, 1),
        "relay_hop_msgs_per_s": round(relay_rate, 1),
    }


def run_raw(nats_url: str, seconds: float, payload_bytes: int, creds: str | None = None) -> dict[str, Any]:
    """Entry point of the raw-limit process."""
    return asyncio.run(_raw_limits(nats_url, seconds, payload_bytes, creds))


# --- the orchestrator --------------------------------------------------------------------------------------
async def _projected_total(client: httpx.AsyncClient, metrics_url: str | None) -> float | None:
    if not metrics_url:
        return None
    try:
        response = await client.get(f"{metrics_url}/metrics/")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total = 0.0
    for line in response.text.splitlines():
        if line.startswith(PROJECTED_METRIC + "{") or line.startswith(PROJECTED_METRIC + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _consumers_idle(js: Any) -> bool:
    for stream, durable in (
        (STREAM_IN, CONSUMER_INTAKE),
        (STREAM_EVENTS, CONSUMER_ROUTING),
        (STREAM_EVENTS, CONSUMER_NOTIFIER),
        (STREAM_EVENTS, CONSUMER_METRICS),
    ):
        info = await js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def _stream_writes(js: Any) -> dict[str, int]:
    """Last sequence of every Baton stream: the difference over a phase is the messages written to it."""
    out: dict[str, int] = {}
    for stream in (STREAM_IN, STREAM_EVENTS, STREAM_NOTIFY, STREAM_DLQ, STREAM_TIMERS):
        with contextlib.suppress(Exception):
            out[stream] = int((await js.stream_info(stream)).state.last_seq)
    return out


async def _notify_count(js: Any) -> int:
    info = await js.stream_info(STREAM_NOTIFY)
    return int(info.state.messages)


class Bench:
    def __init__(self, config: BenchConfig, echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.echo = echo
        self.nats_url = config.nats_url or ""
        self.creds = str(config.creds) if config.creds else None
        self.metrics_url = config.metrics_url
        self.pids: dict[str, int] = {}
        self.departments: tuple[str, ...] = ()
        self.categories: dict[str, str] = {}

    async def run(self) -> tuple[dict[str, Any], Path]:
        from libs.contracts.catalog_file import load_catalog

        from .supervisor import Stack, StackConfig

        cfg = self.config
        served = {d.slug: d.categories[0] for d in load_catalog(cfg.catalog_path).departments if d.categories}
        self.departments = tuple(sorted(served))
        self.categories = {slug: str(category) for slug, category in served.items()}
        publishers = max(1, min(cfg.publishers, len(self.departments) // 2))
        stack: Stack | None = None
        tmp: tempfile.TemporaryDirectory[str] | None = None
        if not self.nats_url:
            tmp = tempfile.TemporaryDirectory(prefix="baton-bench-")
            extra_env: dict[str, str] = {}
            if cfg.profile:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
                extra_env = profile_env(Path(tmp.name) / "hook", cfg.out_dir / f"{stamp}-profile", cfg.profile)
            stack = Stack(
                StackConfig(
                    data_dir=Path(tmp.name),
                    catalog_path=cfg.catalog_path,
                    nats_port=0,
                    monitor_port=None,
                    http_base_port=0,
                    extra_env=extra_env,
                )
            )
            self.echo("starting the embedded stack ...")
            try:
                await stack.start()
            except BaseException:
                await stack.stop()
                tmp.cleanup()
                raise
            self.nats_url = stack.nats_url
            self.creds = str(stack.credentials()) if stack.auth else None
            self.metrics_url = stack.services["metrics"].url
            self.pids = {name: svc.proc.pid for name, svc in stack.services.items() if svc.proc is not None}
            if stack.nats is not None and stack.nats.pid is not None:
                self.pids["nats-server"] = stack.nats.pid
        try:
            return await self._measure(publishers)
        finally:
            if stack is not None:
                await stack.stop()
            if tmp is not None:
                if cfg.keep_logs is not None and (Path(tmp.name) / "logs").is_dir():
                    shutil.copytree(Path(tmp.name) / "logs", cfg.keep_logs, dirs_exist_ok=True)
                tmp.cleanup()

    async def _measure(self, publishers: int) -> tuple[dict[str, Any], Path]:
        cfg = self.config
        d = cfg.duration
        raw_each = max(1.0, 0.2 * d / 3)
        fixed_s = max(1.0, 0.35 * d)
        sat_s = max(1.0, 0.35 * d)
        sampler = ResourceSampler(self.pids)
        sampler.start()
        nc = await nats.connect(self.nats_url, name="baton-bench", **_options(self.creds))
        js = nc.jetstream()
        ctx = multiprocessing.get_context("spawn")
        result: dict[str, Any] = {
            "started_at": datetime.now(UTC).isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": os.uname().sysname, "release": os.uname().release},
            "config": {
                "duration": d,
                "rate": cfg.rate,
                "publishers": publishers,
                "window": cfg.window,
                "departments": list(self.departments),
                "embedded": not cfg.nats_url,
                "profiled": list(cfg.profile),
            },
        }
        try:
            with ProcessPoolExecutor(max_workers=max(publishers, 1), mp_context=ctx) as pool:
                loop = asyncio.get_running_loop()
                self.echo(f"raw NATS limit ({raw_each:.0f} s each: publish, consume, relay hop) ...")
                cpu0 = sampler.cpu()
                result["raw"] = await loop.run_in_executor(
                    pool, run_raw, self.nats_url, raw_each, cfg.payload_bytes, self.creds
                )
                result["raw"]["cpu_seconds"] = cpu_delta(cpu0, sampler.cpu())
                lc_rate = cfg.rate / len(INBOUND_TYPES) / publishers
                self.echo(f"fixed rate: {cfg.rate:g} inbound events/s for {fixed_s:.0f} s ...")
                result["fixed_rate"] = await self._phase(
                    pool, js, sampler, publishers, fixed_s, lifecycles_per_s=lc_rate, window=0
                )
                result["fixed_rate"]["offered_inbound_events_per_s"] = cfg.rate
                self.echo(f"saturation: {cfg.window} lifecycles in flight per publisher for {sat_s:.0f} s ...")
                result["saturation"] = await self._phase(
                    pool, js, sampler, publishers, sat_s, lifecycles_per_s=0.0, window=cfg.window
                )
        finally:
            await sampler.stop()
            await nc.close()
        relay = result["raw"]["relay_hop_msgs_per_s"]
        sat = result["saturation"]["throughput_canonical_events_per_s"]
        result["ratio_to_relay_hop"] = round(sat / relay, 4) if relay else None
        result["memory_mib"] = {
            name: {
                "first": round(s[0], 1) if s else None,
                "last": round(s[-1], 1) if s else None,
                "max": round(max(s), 1) if s else None,
                "per_minute": sampler.per_minute(name),
            }
            for name, s in sampler.rss.items()
        }
        result["finished_at"] = datetime.now(UTC).isoformat()
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        path = cfg.out_dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result, path

    async def _phase(
        self,
        pool: ProcessPoolExecutor,
        js: Any,
        sampler: ResourceSampler,
        publishers: int,
        seconds: float,
        *,
        lifecycles_per_s: float,
        window: int,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=5.0) as client:
            projected0 = await _projected_total(client, self.metrics_url)
            notify0 = await _notify_count(js)
            writes0 = await _stream_writes(js)
            cpu0 = sampler.cpu()
            jobs = [
                PublisherJob(
                    self.nats_url,
                    i,
                    self.departments[i::publishers],
                    tuple(self.categories[d] for d in self.departments[i::publishers]),
                    seconds,
                    lifecycles_per_s=lifecycles_per_s,
                    window=window,
                    max_in_flight=max(self.config.window, math.ceil(lifecycles_per_s)),
                    finish_timeout=self.config.drain_timeout,
                    creds=self.creds,
                )
                for i in range(publishers)
            ]
            futures: list[Awaitable[dict[str, Any]]] = [loop.run_in_executor(pool, run_publisher, j) for j in jobs]
            parts = await asyncio.gather(*futures)
            completed = sum(p["completed"] for p in parts)
            started = sum(p["started"] for p in parts)
            # At least: created + routed of every lifecycle, the other four of every completed one.
            expected = started * 2 + completed * (CANONICAL_PER_LIFECYCLE - 2)
            # Drained: every consumer acked everything and metrics projected every canonical event.
            limit = time.monotonic() + self.config.drain_timeout
            drained = False
            first_poll = True
            projected = projected0
            while time.monotonic() < limit:
                projected = await _projected_total(client, self.metrics_url)
                caught_up = projected is None or projected0 is None or projected - projected0 >= expected
                if caught_up and await _consumers_idle(js):
                    drained = True
                    break
                first_poll = False
                await asyncio.sleep(0.05)
            drained_at = time.monotonic()
            cpu = cpu_delta(cpu0, sampler.cpu())
            notified = await _notify_count(js) - notify0
            writes1 = await _stream_writes(js)
        first_ack = min(p["first_ack"] for p in parts if p["first_ack"])
        last_ack = max(p["last_ack"] for p in parts)
        last_note = max(p["last_notification"] for p in parts)
        # The drain poll starts only once the publishers have exited: when everything was already done at
        # the first poll, the last notification the publishers saw is the sharper end.
        end = drained_at
        if drained and first_poll and last_note:
            end = max(last_note, last_ack)
        elapsed = max(end - first_ack, 1e-9)
        acked = sum(p["events_acked"] for p in parts)
        # Canonical events of the phase: metrics' own count when it answers (exact), else the lower bound.
        canonical = int(projected - projected0) if projected is not None and projected0 is not None else expected
        latencies = {t: percentiles([x for p in parts for x in p["latency_ms"][t]]) for t in INBOUND_TYPES}
        all_latencies = percentiles([x for p in parts for t in INBOUND_TYPES for x in p["latency_ms"][t]])
        per_event_cpu_ms = {
            name: (round(sec * 1000 / canonical, 3) if sec is not None and canonical else None)
            for name, sec in cpu.items()
        }
        return {
            "seconds": seconds,
            "lifecycles_started": started,
            "lifecycles_completed": completed,
            "lifecycles_failed": sum(p["failed"] for p in parts),
            "lifecycles_shed": sum(p["shed"] for p in parts),
            "inbound_events_acked": acked,
            "canonical_events": canonical,
            "notifications_written": notified,
            "stream_writes": {name: writes1[name] - writes0[name] for name in writes1 if name in writes0},
            "events_without_notification": sum(p["notifications_without_event"] for p in parts),
            "rejected": sum(p["rejected"] for p in parts),
            "rejection_samples": [r for p in parts for r in p["rejection_samples"]][:3],
            "metrics_projected": None if projected is None or projected0 is None else projected - projected0,
            "drained": drained,
            "elapsed_s": round(elapsed, 3),
            "publish_window_s": round(last_ack - first_ack, 3),
            "achieved_inbound_events_per_s": round(acked / max(last_ack - first_ack, 1e-9), 1),
            "throughput_canonical_events_per_s": round(canonical / elapsed, 1),
            "throughput_inbound_events_per_s": round(acked / elapsed, 1),
            "latency_ms": {"all": all_latencies, **latencies},
            "created_to_routed_notification_ms": percentiles([x for p in parts for x in p["created_to_routed_ms"]]),
            "cpu_seconds": cpu,
            "cpu_percent": {
                name: (round(sec * 100 / elapsed, 1) if sec is not None else None) for name, sec in cpu.items()
            },
            "cpu_ms_per_canonical_event": per_event_cpu_ms,
        }


def table(result: dict[str, Any]) -> str:
    """A short human summary of a result."""
    raw = result["raw"]
    lines = [
        f"raw NATS ({raw['payload_bytes']} B): publish {raw['publish_msgs_per_s']:,.0f}/s, "
        f"consume {raw['consume_msgs_per_s']:,.0f}/s, relay hop {raw['relay_hop_msgs_per_s']:,.0f}/s",
        "",
        f"{'phase':<12} {'events/s':>9} {'inbound/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for name in ("fixed_rate", "saturation"):
        phase = result[name]
        lat = phase["latency_ms"]["all"]

        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.1f}"

        lines.append(
            f"{name:<12} {phase['throughput_canonical_events_per_s']:>9.1f} "
            f"{phase['throughput_inbound_events_per_s']:>10.1f} {fmt(lat['p50']):>8} {fmt(lat['p90']):>8} "
            f"{fmt(lat['p99']):>8} {fmt(lat['max']):>8}"
        )
    ratio = result["ratio_to_relay_hop"]
    lines.append("")
    lines.append(f"saturation / relay hop: {'-' if ratio is None else f'{ratio:.1%}'}")
    cpu = result["saturation"]["cpu_percent"]
    per = result["saturation"]["cpu_ms_per_canonical_event"]
    mem = result["memory_mib"]
    if cpu:
        lines.append("")
        lines.append(f"{'process':<12} {'CPU % (sat)':>11} {'CPU ms/event':>12} {'RSS MiB first/last/max':>24}")
        for name in cpu:
            m = mem.get(name, {})
            lines.append(
                f"{name:<12} {cpu[name] or 0:>11.1f} {per[name] or 0:>12.3f} "
                f"{m.get('first') or 0:>8.1f}/{m.get('last') or 0:.1f}/{m.get('max') or 0:.1f}"
            )
    if any(len(m.get("per_minute") or []) > 2 for m in mem.values()):
        lines.append("")
        lines.append("RSS MiB, largest in each minute of the run:")
        for name, m in mem.items():
            lines.append(f"{name:<12} " + " ".join(f"{v:.0f}" for v in m.get("per_minute") or []))
    return "\n".join(lines)
