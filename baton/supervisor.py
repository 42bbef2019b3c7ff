"""The embedded stack behind ``baton up``: nats-server from the wheel, provisioning, and the four
services, each its own supervised process with its own SQLite database.

Used by the CLI, the end-to-end tests and the benchmark, so all three run Baton the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from libs.contracts import Catalog
from libs.contracts.catalog_file import load_catalog
from libs.contracts.natsauth import connect_options

from .cmd_tokens import ensure_stack_tokens
from .nats_config import AUTH_CONF, Kind, credential_path, write_nats_config
from .natsserver import NatsServer, die_with_parent, free_port
from .provision import provision

log = logging.getLogger("baton.up")

SERVICES = ("intake", "routing", "notifier", "metrics")
DEFAULT_NATS_PORT = 14222
DEFAULT_MONITOR_PORT = 18222
DEFAULT_HTTP_BASE_PORT = 8101  # intake 8101, routing 8102, notifier 8103, metrics 8104

#: A service that dies more often than this within RESTART_WINDOW is given up on.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


@dataclass
class StackConfig:
    data_dir: Path = Path(".baton")
    catalog_path: Path = Path("deploy/catalog.yaml")
    nats_port: int = DEFAULT_NATS_PORT  # 0 = any free port
    monitor_port: int | None = DEFAULT_MONITOR_PORT
    http_host: str = "127.0.0.1"
    http_base_port: int = DEFAULT_HTTP_BASE_PORT  # 0 = any free ports
    nats_url: str | None = None  # target a running NATS instead of starting one
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 60.0
    #: NATS users per department and service (docs/security.md). With ``nats_url`` (a running server),
    #: the credential files already under ``data_dir/nats/creds`` are used when there are any.
    auth: bool = True
    #: Per service (``{"routing": {...}}``), applied over ``extra_env``: e.g. a database URL, a failpoint.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Restart policy of a service that exits on its own (the fault tests kill services on purpose).
    max_restarts: int = MAX_RESTARTS
    max_restart_delay: float = 10.0


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.env[f'BATON_{self.name.upper()}_HTTP_HOST']}:{self.port}"


class Stack:
    """Start, supervise and stop the embedded Baton stack."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.catalog: Catalog = load_catalog(config.catalog_path)
        self.nats: NatsServer | None = None
        self.nats_url = config.nats_url or ""
        self.services: dict[str, ServiceProcess] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._closing = False
        self.tokens_path = self.data_dir / "tokens.yaml"
        self.new_tokens_file: Path | None = None
        self.nats_dir = self.data_dir / "nats"
        #: True once NATS users are in force: every client then needs its credential file.
        self.auth = False

    # --- start ---------------------------------------------------------------------
    async def start(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        # First start (or a data dir from before tokens): one token per department plus an operator token.
        self.new_tokens_file = ensure_stack_tokens(self.data_dir, [d.slug for d in self.catalog.departments])
        if self.new_tokens_file is not None:
            log.info("made department tokens; their only plaintext copy is %s", self.new_tokens_file)
        if self.config.auth and not self.nats_url:
            # Users from the current catalog on every start; existing passwords are kept.
            report = write_nats_config(self.nats_dir, self.catalog, server_conf=False)
            if report.created:
                log.info("made NATS credentials for %s in %s", ", ".join(report.created), self.nats_dir / "creds")
        self.auth = self.config.auth and credential_path(self.nats_dir, "admin", "admin").exists()
        if not self.nats_url:
            self.nats = NatsServer(
                self.nats_dir,
                port=self.config.nats_port,
                monitor_port=self.config.monitor_port,
                server_name="baton-embedded",
                die_with_parent=True,
                extra_config=f"include {AUTH_CONF}" if self.auth else "",
                client_options=self.client_options(),
            )
            await self.nats.start_async()
            self.nats_url = self.nats.url
        await provision(self.nats_url, self.catalog, connect_options=self.client_options())
        for index, name in enumerate(SERVICES):
            port = free_port() if self.config.http_base_port == 0 else self.config.http_base_port + index
            self.services[name] = self._service(name, port)
        for svc in self.services.values():
            await self._spawn(svc)
            self._watchers.append(asyncio.create_task(self._watch(svc), name=f"watch-{svc.name}"))
        await self.wait_ready()

    def _service(self, name: str, port: int) -> ServiceProcess:
        prefix = f"BATON_{name.upper()}_"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            prefix + "NATS_URL": self.nats_url,
            prefix + "DATABASE_URL": f"sqlite+aiosqlite:///{self.data_dir / 'data' / f'{name}.db'}",
            prefix + "HTTP_HOST": self.config.http_host,
            prefix + "HTTP_PORT": str(port),
            prefix + "CATALOG_PATH": str(self.config.catalog_path.resolve()),
            prefix + "TOKENS_PATH": str(self.tokens_path),
            "OTEL_SERVICE_NAME": f"baton-{name}",
            # One intake replica: no standby to hand over to, so no consumer lease. With a lease, an
            # intake restarted after kill -9 would wait out the dead holder's key (the TTL) and its
            # unacked batch (the ack wait) before consuming again (docs/architecture.md).
            **({prefix + "CONSUMER_LEASE": "false"} if name == "intake" else {}),
            **self.config.extra_env,
            **self.config.service_env.get(name, {}),
        }
        if self.auth:
            env[prefix + "NATS_CREDENTIALS"] = str(self.credentials("service", name))
        return ServiceProcess(name, port, env, self.data_dir / "logs" / f"{name}.log")

    async def _spawn(self, svc: ServiceProcess) -> None:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        logfile = svc.log_path.open("ab")
        try:
            svc.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{svc.name}",
                env=svc.env,
                stdout=logfile,
                stderr=subprocess_stdout(),
                stdin=asyncio.subprocess.DEVNULL,
                # Own session: Ctrl-C reaches only the supervisor, which stops services in order.
                start_new_session=True,
                # ... and if the supervisor itself dies (SIGKILL, a crash), the services go with it.
                preexec_fn=die_with_parent,
            )
        finally:
            logfile.close()
        log.info("started %s (pid %s) on port %d", svc.name, svc.proc.pid, svc.port)

    async def _watch(self, svc: ServiceProcess) -> None:
        """Restart a service that exits on its own, with a growing delay; give up if it keeps dying."""
        while not self._closing and not svc.stopping:
            assert svc.proc is not None
            code = await svc.proc.wait()
            if self._closing or svc.stopping:
                return
            now = time.monotonic()
            svc.restarts = [t for t in svc.restarts if now - t < RESTART_WINDOW] + [now]
            if len(svc.restarts) > self.config.max_restarts:
                log.error(
                    "%s exited %d times within %.0fs; giving up (see %s)",
                    svc.name,
                    self.config.max_restarts,
                    RESTART_WINDOW,
                    svc.log_path,
                )
                return
            delay = min(2.0 ** (len(svc.restarts) - 1), self.config.max_restart_delay)
            log.warning("%s exited with %s; restarting in %.0fs (log: %s)", svc.name, code, delay, svc.log_path)
            await asyncio.sleep(delay)
            if not self._closing:
                await self._spawn(svc)

    async def wait_ready(self, within: float | None = None) -> None:
        deadline = time.monotonic() + (within or self.config.ready_timeout)
        pending = set(self.services)
        async with httpx.AsyncClient(timeout=2.0) as client:
            while pending:
                for name in sorted(pending):
                    svc = self.services[name]
                    if svc.proc is not None and svc.proc.returncode is not None and not svc.restarts:
                        raise RuntimeError(f"{name} exited with {svc.proc.returncode}; see {svc.log_path}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{svc.url}/readyz")).status_code == 200:
                            pending.discard(name)
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"not ready in time: {', '.join(sorted(pending))} (logs in {self.data_dir})")
                if pending:
                    await asyncio.sleep(0.2)

    # --- NATS identities -----------------------------------------------------------------
    def credentials(self, kind: Kind = "admin", name: str = "admin") -> Path:
        """An identity's credential file (``kind`` department/service/admin)."""
        return credential_path(self.nats_dir, kind, name)

    def client_options(self, kind: Kind = "admin", name: str = "admin") -> dict[str, Any]:
        """``nats.connect`` keywords for an identity; empty when the stack runs without NATS users."""
        if not self.auth:
            return {}
        return connect_options(credentials=self.credentials(kind, name))

    # --- control (tests and faults use these) ------------------------------------------
    async def kill_service(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a service; the supervisor restarts it like a real crash."""
        proc = self.services[name].proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(sig)

    async def restart_nats(self, *, kill: bool = False) -> None:
        """Stop (or kill) the embedded nats-server and start it again: same port, same JetStream data."""
        if self.nats is None:
            raise RuntimeError("this stack targets an external NATS; it cannot restart it")
        await self.nats.restart_async(kill=kill)

    # --- stop --------------------------------------------------------------------------
    async def stop(self, grace: float = 20.0) -> None:
        """Stop the services (SIGTERM: they drain in-flight work), then NATS."""
        self._closing = True
        for svc in self.services.values():
            svc.stopping = True
            if svc.proc is not None and svc.proc.returncode is None:
                svc.proc.send_signal(signal.SIGTERM)
        for svc in self.services.values():
            if svc.proc is None:
                continue
            try:
                await asyncio.wait_for(svc.proc.wait(), grace)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", svc.name, grace)
                svc.proc.kill()
                await svc.proc.wait()
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self.nats is not None:
            await self.nats.stop_async()

    def describe(self) -> list[tuple[str, str]]:
        rows = [("NATS", self.nats_url)]
        if self.auth:
            rows.append(
                ("NATS users", f"{self.nats_dir / 'creds'} (one credential file per department; docs/security.md)")
            )
        else:
            rows.append(("NATS users", "none: anyone who reaches the port may publish and read everything"))
        if self.nats is not None and self.nats.monitor_url:
            rows.append(("NATS monitoring", self.nats.monitor_url))
        for svc in self.services.values():
            rows.append((svc.name, svc.url))
        metrics = self.services.get("metrics")
        if metrics is not None:
            rows.append(("dashboard", f"{metrics.url}/"))
            rows.append(("timeline API", f"{metrics.url}/v1/requests/<request_id>/timeline"))
        rows.append(("data", str(self.data_dir)))
        if self.new_tokens_file is not None:
            rows.append(("tokens", f"{self.new_tokens_file} (new; the only plaintext copy: hand them out, delete it)"))
        else:
            rows.append(("tokens", f"{self.tokens_path} (hashes; `baton token new <dept>` makes another)"))
        rows.append(("logs", str(self.data_dir / "logs")))
        return rows


def subprocess_stdout() -> int:
    """stderr goes to the same log file as stdout."""
    return asyncio.subprocess.STDOUT
