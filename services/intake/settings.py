"""Intake's settings, read from ``BATON_INTAKE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.contracts import natsauth


class IntakeSettings(natsauth.NatsClientSettings):
    """NATS login and TLS, HTTPS: the fields of :class:`NatsClientSettings` (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="BATON_INTAKE_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/intake.db"
    migrate_on_start: bool = Field(
        default=True,
        description="Migrate the database to head at start (embedded default). False in production, where "
        "`baton migrate` runs once before the replicas start and they only check the database is at head.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8101
    fetch_batch: int = Field(default=64, ge=1, le=1000, description="Messages fetched per pull request.")
    fetch_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds one pull request waits for a message while the consumer is idle (a batch is handed "
        "over as soon as anything arrived).",
    )
    retry_delay: float = Field(default=2.0, gt=0, description="Seconds before a failed message is redelivered.")
    graceful_timeout: float = Field(default=15.0, gt=0, description="Seconds to drain in-flight work on SIGTERM.")
    log_level: str = "INFO"
    tokens_path: Path | None = Field(
        default=None,
        description="Department token file (libs/contracts/tokens.py), re-read when it changes; "
        "without it the HTTP API refuses every call with 401.",
    )
    consumer_lease: bool = Field(
        default=True,
        description="Consume BATON_IN only while holding the intake lease (one active replica, the others on "
        "standby; services/intake/lease.py). Turn off only when exactly one replica can ever run.",
    )
    outbox_interval: float = Field(
        default=5.0, gt=0, description="Seconds between publishes of HTTP-committed events that missed their PubAck."
    )
