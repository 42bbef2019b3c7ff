"""Metrics' settings, read from ``BATON_METRICS_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.contracts import natsauth


class MetricsSettings(natsauth.NatsClientSettings):
    """NATS login and TLS, HTTPS: the fields of :class:`NatsClientSettings` (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="BATON_METRICS_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/metrics.db"
    migrate_on_start: bool = Field(
        default=True,
        description="Migrate the database to head at start (embedded default). False in production, where "
        "`baton migrate` runs once before the replicas start and they only check the database is at head.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8104
    fetch_batch: int = Field(default=64, ge=1, le=1000, description="Messages fetched per pull request.")
    fetch_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds one pull request waits for a message while the consumer is idle (a batch is handed "
        "over as soon as anything arrived).",
    )
    retry_delay: float = Field(
        default=2.0,
        gt=0,
        description="First redelivery delay of a failed message; doubled per delivery, capped at 30 s.",
    )
    graceful_timeout: float = Field(default=15.0, gt=0, description="Seconds to drain in-flight work on SIGTERM.")
    log_level: str = "INFO"
    catalog_path: Path | None = Field(
        default=None, description="Department catalog (YAML): names and kinds (internal/vendor) on scorecards."
    )
    tokens_path: Path | None = Field(
        default=None,
        description="Department token file (libs.contracts.tokens). Unset: open access, with a loud warning.",
    )
    jaeger_url: str | None = Field(
        default=None, description="Jaeger UI base URL, e.g. http://127.0.0.1:16686: request pages link their trace."
    )
    default_window: str = Field(default="30d", description="KPI window when none is asked for.")
    live_poll_seconds: float = Field(default=5.0, gt=0, description="How often dashboard pages poll for updates.")
    secure_cookie: bool = Field(default=False, description="Mark the sign-in cookie Secure (behind HTTPS).")
