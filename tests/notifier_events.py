"""A canonical lifecycle (as intake appends it) and who must hear about it, plus the local HTTP endpoint,
token file and signature check used by the notifier's webhook, digest, feed and restart tests."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from libs.contracts import Accepted, Created, Delayed, LifecycleEvent, Resolved, Routed, dumps
from libs.contracts.subjects import event_subject
from libs.contracts.tokens import TokenEntry, TokenFile, generate_token, hash_token, save_token_file

#: Tue 24 Nov 2026, 09:00 UTC.
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def lifecycle(rid: str) -> list[LifecycleEvent]:
    """Finance raises (Legal watches) -> routed to IT -> accepted -> delayed -> resolved; sequences 1..5."""

    def env(kind: str, dept: str, minutes: float, seq: int) -> dict[str, Any]:
        return {
            "event_id": f"{rid}-{kind}",
            "request_id": rid,
            "occurred_at": at(minutes),
            "actor": {"department": dept, "person": "Ana" if dept == "finance" else "Sam"},
            "sequence": seq,
            "recorded_at": at(minutes) + timedelta(seconds=1),
            "trace_id": TRACE,
        }

    return [
        Created(
            **env("c", "finance", 0, 1),
            title="Laptop for new hire",
            category="laptop",
            priority="high",
            requester={"department": "finance", "person": "Ana"},
            watchers=["legal"],
        ),
        Routed(**env("r", "baton", 1, 2), provider_department="it", rule="category:laptop", caused_by=f"{rid}-c"),
        Accepted(**env("a", "it", 30, 3), assignee="Sam", eta=at(8 * 60)),  # 17:00 UTC = 18:00 Paris
        Delayed(**env("d", "it", 120, 4), reason="supplier backorder", new_eta=at(29 * 60)),  # Wed 25 Nov 14:00 UTC
        Resolved(**env("z", "it", 26 * 60, 5), resolution="delivered to desk 4", outcome="done"),
    ]


def subject_and_body(event: LifecycleEvent) -> tuple[str, bytes]:
    return event_subject(event.request_id, event.type), dumps(event)


#: (type, role) each department must receive for ``lifecycle()``, in sequence order.
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "finance": [
        ("created", "requester"),
        ("routed", "requester"),
        ("accepted", "requester"),
        ("delayed", "requester"),
        ("resolved", "requester"),
    ],
    "legal": [("created", "watcher"), ("delayed", "watcher"), ("resolved", "watcher")],
    "it": [("routed", "provider"), ("accepted", "provider"), ("delayed", "provider"), ("resolved", "provider")],
}

#: The delayed sentence as Legal (America/New_York) and IT (Europe/Paris) read it, with the example catalog.
DELAYED_TEXT = {
    "legal": "IT Operations delayed 'Laptop for new hire' ({rid}): supplier backorder — "
    "new ETA Wed 25 Nov 09:00, was Tue 24 Nov 12:00 (1st delay)",
    "it": "IT Operations delayed 'Laptop for new hire' ({rid}): supplier backorder — "
    "new ETA Wed 25 Nov 15:00, was Tue 24 Nov 18:00 (1st delay)",
}


# --- helpers for the webhook, digest, feed and restart tests ------------------------------------------


def write_tokens(path: Path, departments: list[str]) -> dict[str, str]:
    """A token file with one token per department and one operator token (key ``operator``)."""
    tokens = {dept: generate_token(dept) for dept in departments}
    tokens["operator"] = generate_token(None)
    entries = [
        TokenEntry(
            id=f"t-{name}",
            department=None if name == "operator" else name,
            operator=name == "operator",
            sha256=hash_token(token),
        )
        for name, token in tokens.items()
    ]
    save_token_file(path, TokenFile(tokens=entries))
    return tokens


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300.0) -> bool:
    """The verification recipe of docs/notifications.md, written out independently of the notifier's code."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


@dataclass
class HookServer:
    """A local HTTP endpoint; ``behaviour[path](n)`` gives the status of the n-th request (1-based) to ``path``,
    and ``delay[path]`` seconds are slept before answering."""

    url: str
    hits: list[Hit] = field(default_factory=list)
    behaviour: dict[str, Callable[[int], int]] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]


@contextmanager
def hook_server() -> Iterator[HookServer]:
    state = HookServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                count = sum(1 for h in state.hits if h.path == self.path) + 1
            wait = state.delay.get(self.path, 0.0)
            if wait:
                time.sleep(wait)
            status = state.behaviour[self.path](count) if self.path in state.behaviour else 200
            with state.lock:
                state.hits.append(Hit(self.path, dict(self.headers.items()), body, time.monotonic(), status))
            try:
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the client gave up (timeout)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="hook-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
