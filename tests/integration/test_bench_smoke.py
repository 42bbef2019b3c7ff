"""A short smoke of ``baton bench``: it starts the embedded stack, runs every phase and writes every field.

A benchmark is a measurement, not a test: nothing here asserts a duration, a rate or a latency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PHASE_FIELDS = {
    "seconds",
    "lifecycles_started",
    "lifecycles_completed",
    "lifecycles_failed",
    "lifecycles_shed",
    "inbound_events_acked",
    "canonical_events",
    "notifications_written",
    "stream_writes",
    "events_without_notification",
    "rejected",
    "rejection_samples",
    "metrics_projected",
    "drained",
    "elapsed_s",
    "publish_window_s",
    "achieved_inbound_events_per_s",
    "throughput_canonical_events_per_s",
    "throughput_inbound_events_per_s",
    "latency_ms",
    "created_to_routed_notification_ms",
    "cpu_seconds",
    "cpu_percent",
    "cpu_ms_per_canonical_event",
}
LATENCY_FIELDS = {"count", "p50", "p90", "p99", "max", "mean"}
PROCESSES = {"intake", "routing", "notifier", "metrics", "nats-server"}


def test_bench_writes_every_field(tmp_path: Path, catalog_path: Path) -> None:
    out = tmp_path / "results"
    args = ["--duration", "6", "--rate", "20", "--window", "3", "--drain-timeout", "30"]
    run = subprocess.run(
        [sys.executable, "-m", "baton.cli", "bench", *args, "--out", str(out), "--catalog", str(catalog_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "relay hop" in run.stdout
    files = list(out.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())

    assert {"started_at", "finished_at", "machine", "config", "raw", "fixed_rate", "saturation"} <= result.keys()
    assert {"ratio_to_relay_hop", "memory_mib"} <= result.keys()
    raw = result["raw"]
    for key in ("publish_msgs_per_s", "consume_msgs_per_s", "relay_hop_msgs_per_s"):
        assert raw[key] > 0
    assert raw["cpu_seconds"].keys() >= PROCESSES
    for name in ("fixed_rate", "saturation"):
        phase = result[name]
        assert phase.keys() >= PHASE_FIELDS, PHASE_FIELDS - phase.keys()
        assert phase["lifecycles_completed"] > 0
        assert phase["rejected"] == 0, phase["rejection_samples"]
        assert {"all", "created", "accepted", "delayed", "resolved", "feedback"} <= phase["latency_ms"].keys()
        assert phase["latency_ms"]["all"].keys() >= LATENCY_FIELDS
        assert phase["latency_ms"]["all"]["count"] > 0
        assert phase["cpu_seconds"].keys() >= PROCESSES
        assert phase["cpu_ms_per_canonical_event"].keys() >= PROCESSES
    assert result["fixed_rate"]["offered_inbound_events_per_s"] == 20
    assert result["memory_mib"].keys() >= PROCESSES
    for sample in result["memory_mib"].values():
        assert {"first", "last", "max", "per_minute"} <= sample.keys()
        assert sample["per_minute"]
        assert max(sample["per_minute"]) == sample["max"]


@pytest.mark.parametrize("record", [False, True], ids=["propagating-spans", "recorded-spans"])
def test_the_pipeline_cpu_benchmark_runs_clean_lifecycles(record: bool) -> None:
    """``scripts/bench_pipeline_cpu.py`` plays whole lifecycles through the four processors (it exits non-zero
    when any event was not appended, not projected, or dead-lettered) and prints a row per service."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "scripts/bench_pipeline_cpu.py", "--lifecycles", "8", "--repeat", "1", "--batch", "5"]
    done = subprocess.run(
        command + (["--record-spans"] if record else []), cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("8 lifecycles (48 canonical events), batches of 5")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"intake", "routing", "notifier", "metrics", "the"}
    assert all(float(rows[name][2]) > 0 for name in ("intake", "routing", "notifier", "metrics"))  # statements
