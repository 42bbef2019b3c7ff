"""Webhook signing, payload formats and the retry schedule. Pure: no I/O (the worker is in ``workers.py``).

Every delivery is a ``POST`` of a JSON body with these headers:

* ``Baton-Signature: t=<unix seconds>,v1=<hex>``: ``v1`` is HMAC-SHA256, keyed with the subscription's
  secret, over ``f"{t}.".encode() + body`` (the exact bytes received). ``t`` is the time of *this*
  attempt, so a retry carries a fresh signature; receivers refuse a ``t`` outside their replay window
  (5 minutes is the recommended tolerance) and compare signatures in constant time;
* ``Baton-Delivery-Id`` (the same on every attempt of one delivery), ``Baton-Notification-Id``,
  ``Baton-Event-Type``, ``Baton-Webhook-Id``, ``Baton-Attempt``; ``traceparent`` of the POST's
  span (in the request's trace; a digest's in a trace of its own).

Delivery is at least once: dedupe on ``Baton-Delivery-Id`` (or the notification id in the body).
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from dataclasses import dataclass
from enum import StrEnum

import orjson

SIGNATURE_HEADER = "Baton-Signature"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 300.0
SECRET_PREFIX = "whsec_"  # noqa: S105 - a public prefix, not a secret


class Format(StrEnum):
    BATON = "baton"  # the notification (or digest) JSON, exactly as on the department's stream
    SLACK = "slack"  # {"text": ...}: Slack and Mattermost incoming webhooks


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_webhook_id() -> str:
    return "wh_" + secrets.token_hex(8)


def delivery_id(subscription_id: str, notification_id: str) -> str:
    return "wd-" + hashlib.sha256(f"{subscription_id}:{notification_id}".encode()).hexdigest()[:40]


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Baton-Signature`` header value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},{SIGNATURE_VERSION}={mac}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """The receiver's check (the recipe in docs/notifications.md): a fresh timestamp and a matching MAC."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get(SIGNATURE_VERSION, ""))


def render_body(fmt: Format, stored: bytes) -> bytes:
    """The bytes POSTed for a stored notification or digest body, in the subscription's format."""
    if fmt is Format.BATON:
        return stored
    doc = orjson.loads(stored)
    if doc.get("type") == "digest":
        lines = [doc.get("text", "")]
        for request in doc.get("requests", []):
            lines.append(f"• {request.get('title', '')} ({request.get('request_id', '')})")
            lines.extend(f"    - {item.get('text', '')}" for item in request.get("items", []))
        return orjson.dumps({"text": "\n".join(lines)})
    return orjson.dumps({"text": doc.get("text", "")})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base`` doubled per failed attempt, at most ``cap``, with ±``jitter`` of it;
    a delivery still failing ``give_up_after`` seconds after it was queued is dead-lettered."""

    base: float = 5.0
    cap: float = 600.0
    give_up_after: float = 3600.0
    jitter: float = 0.1

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones (1, 2, ...)."""
        raw = min(self.cap, self.base * 2 ** max(0, min(attempts - 1, 40)))
        if self.jitter <= 0:
            return float(raw)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return float(raw * (1 + spread))

    def schedule(self) -> list[float]:
        """The nominal delays (no jitter) until giving up: what docs/notifications.md shows."""
        delays: list[float] = []
        elapsed = 0.0
        attempts = 1
        while elapsed < self.give_up_after:
            step = min(self.cap, self.base * 2 ** (attempts - 1))
            delays.append(step)
            elapsed += step
            attempts += 1
        return delays


def wants(event_types: list[str] | tuple[str, ...], kind: str, digest_types: frozenset[str] = frozenset()) -> bool:
    """Whether a subscription filtering on ``event_types`` (empty = all) gets a ``kind`` notification.

    A digest goes to subscriptions that name ``digest`` or any event type the digest lists.
    """
    if not event_types:
        return True
    if kind == "digest":
        return "digest" in event_types or not digest_types.isdisjoint(event_types)
    return kind in event_types
