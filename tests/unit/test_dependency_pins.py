"""Tripwires for dependency pins whose reason is a bug elsewhere (see pyproject.toml)."""

import builtins
from importlib.metadata import version

import faststream.nats.subscriber.usecases.stream_pull_subscriber as pull_loop
import pytest
from packaging.version import Version

pytestmark = pytest.mark.unit


def test_nats_py_pin_still_needed_or_lifted_safely() -> None:
    """nats-py >= 2.15 can raise a bare ``asyncio.TimeoutError`` from ``fetch()``; FastStream 0.7.8's batch
    pull loop catches only ``nats.errors.TimeoutError`` and dies, leaving fetched messages to wait for ack_wait
    (seen as 15 s stalls and reordered events). Lift the pin only once FastStream catches the builtin too."""
    caught = getattr(pull_loop, "TimeoutError")  # noqa: B009 - what the loop's ``except TimeoutError`` catches
    faststream_catches_builtin = issubclass(builtins.TimeoutError, caught)
    if Version(version("nats-py")) >= Version("2.15"):
        assert faststream_catches_builtin, "nats-py >= 2.15 with a FastStream that only catches nats' TimeoutError"
    else:
        assert Version(version("nats-py")) >= Version("2.14")
