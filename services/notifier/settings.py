"""Notifier's settings, read from ``BATON_NOTIFIER_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.contracts import natsauth


class NotifierSettings(natsauth.NatsClientSettings):
    """NATS login and TLS, HTTPS: the fields of :class:`NatsClientSettings` (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="BATON_NOTIFIER_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/notifier.db"
    migrate_on_start: bool = Field(
        default=True,
        description="Migrate the database to head at start (embedded default). False in production, where "
        "`baton migrate` runs once before the replicas start and they only check the database is at head.",
    )
    catalog_path: str = Field(default="deploy/catalog.yaml", description="The department catalog (YAML).")
    http_host: str = "127.0.0.1"
    http_port: int = 8103
    fetch_batch: int = Field(default=64, ge=1, le=1000, description="Messages fetched per pull request.")
    fetch_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds one pull request waits for a message while the consumer is idle (a batch is handed "
        "over as soon as anything arrived).",
    )
    retry_delay: float = Field(default=2.0, gt=0, description="Seconds before a failed message is redelivered.")
    gap_delay: float = Field(
        default=0.5,
        gt=0,
        description="First redelivery delay of an event that arrived before an earlier one of its request; "
        "doubles on every further delivery up to gap_max_delay.",
    )
    gap_max_delay: float = Field(default=30.0, gt=0, description="Longest redelivery delay of an out-of-order event.")
    graceful_timeout: float = Field(default=15.0, gt=0, description="Seconds to drain in-flight work on SIGTERM.")
    tokens_path: str | None = Field(
        default=None,
        description="Department token file (libs.contracts.tokens); without one every authenticated route says 401.",
    )
    # --- webhooks ---
    webhook_timeout: float = Field(default=10.0, gt=0, description="Seconds one webhook POST may take.")
    webhook_backoff_base: float = Field(default=5.0, gt=0, description="First retry delay; doubles per attempt.")
    webhook_backoff_max: float = Field(default=600.0, gt=0, description="Longest retry delay.")
    webhook_retry_for: float = Field(
        default=3600.0, gt=0, description="A delivery still failing this long after it was queued is dead-lettered."
    )
    webhook_poll_interval: float = Field(default=0.5, gt=0, description="How often due deliveries are looked for.")
    webhook_concurrency: int = Field(default=32, ge=1, description="Webhook POSTs in flight, in all.")
    webhook_per_subscription: int = Field(default=2, ge=1, description="Webhook POSTs in flight per subscription.")
    # --- digests and the live feed ---
    digest_interval: float = Field(default=30.0, gt=0, description="How often closed digest windows are looked for.")
    feed_heartbeat: float = Field(default=15.0, gt=0, description="Seconds between SSE keep-alive comments.")
    log_level: str = "INFO"
