"""The private nats-server: starts with JetStream, keeps its data across restarts and crashes."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from baton.natsserver import NatsServer, NatsServerError, find_nats_server_binary

pytestmark = pytest.mark.integration


async def publish_one(url: str, payload: bytes) -> None:
    async with await nats.connect(url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", payload, stream="KEEP")


async def last_payload(url: str) -> bytes:
    async with await nats.connect(url) as nc:
        msg = await nc.jsm().get_last_msg("KEEP", "keep.one")
        assert msg.data is not None
        return msg.data


def test_binary_is_found() -> None:
    binary = find_nats_server_binary()
    assert binary.name == "nats-server"
    assert binary.is_file()


async def test_config_file_and_log_under_store_dir(nats_server: NatsServer) -> None:
    config = nats_server.config_path.read_text(encoding="utf-8")
    assert f"port: {nats_server.port}" in config
    assert "jetstream {" in config
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert "Server is ready" in nats_server.log_path.read_text(encoding="utf-8")
    async with await nats.connect(nats_server.url) as nc:
        info = await nc.jsm().account_info()
    assert info.limits is not None


async def test_data_survives_restart(nats_server: NatsServer) -> None:
    await publish_one(nats_server.url, b"kept")
    port = nats_server.port
    await nats_server.restart_async()
    assert nats_server.port == port
    assert await last_payload(nats_server.url) == b"kept"


async def test_data_survives_a_kill(nats_server: NatsServer) -> None:
    await publish_one(nats_server.url, b"synced")
    await nats_server.restart_async(kill=True)
    assert await last_payload(nats_server.url) == b"synced"


def test_sync_context_manager(tmp_path: Path) -> None:
    with NatsServer(tmp_path, monitor_port=0) as server:
        assert server.running
        assert server.monitor_url is not None
        assert server.monitor_url.startswith("http://127.0.0.1:")
        pid = server.pid
    assert not server.running
    assert pid is not None


def test_bad_config_fails_fast_with_the_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, extra_config="this is { not valid", ready_timeout=5)
    with pytest.raises(NatsServerError, match=r"exited during startup.*\n.*"):
        server.start()
    assert not server.running
