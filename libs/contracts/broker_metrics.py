"""Bounded labels for FastStream's Prometheus middleware (no broker import: each service passes
:func:`bounded_labels` as the middleware's ``settings_provider_factory``).

FastStream labels every message it receives (``handler``) and publishes (``destination``) with the message's
full subject. Baton's subjects carry request ids (``baton.events.<request_id>.<type>``, routing's timer
schedules), so each new request added label sets to FastStream's counters and histograms for good: the services'
memory grew with every request (found with tracemalloc under ``baton bench``: the middleware's ``labels(...)``
calls were the largest growing allocations in every service) and so did each ``/metrics`` page. Here the label
is the subject's family instead, its first two tokens (``baton.events.>``, ``baton.timers.>``, ``$JS.EVENT.>``):
a handful of values per service, whatever the traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

#: Subject tokens kept in the ``destination_name`` label.
FAMILY_TOKENS = 2


def subject_family(subject: str) -> str:
    """``baton.events.REQ-1.created`` -> ``baton.events.>``; a subject of two tokens or fewer is kept whole."""
    tokens = subject.split(".")
    if len(tokens) <= FAMILY_TOKENS:
        return subject
    return ".".join(tokens[:FAMILY_TOKENS]) + ".>"


class ConsumeAttrs(TypedDict):
    """FastStream's ``ConsumeAttrs`` (the same keys; TypedDicts match by shape)."""

    destination_name: str
    message_size: int
    messages_count: int


class BoundedSubjectLabels:
    """A FastStream ``MetricsSettingsProvider`` (duck-typed) for NATS messages and batches of them."""

    messaging_system = "nats"

    def get_consume_attrs_from_message(self, msg: Any) -> ConsumeAttrs:
        raw = msg.raw_message
        batch = list(raw) if isinstance(raw, Sequence) else [raw]
        return {
            "destination_name": subject_family(str(getattr(batch[0], "subject", "") if batch else "")),
            "message_size": len(msg.body),
            "messages_count": len(batch),
        }

    def get_publish_destination_name_from_cmd(self, cmd: Any) -> str:
        return subject_family(str(cmd.destination))


def bounded_labels(msg: Any) -> BoundedSubjectLabels | None:
    """The settings provider for ``msg`` (a NATS message, a batch of them, or None when publishing); None for
    what is neither (a KV or object-store watch), which FastStream then leaves unmeasured, as its own does."""
    if msg is None or hasattr(msg, "subject") or isinstance(msg, Sequence):
        return BoundedSubjectLabels()
    return None
