"""Routing's settings, read from ``BATON_ROUTING_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.contracts import natsauth


class RoutingSettings(natsauth.NatsClientSettings):
    """NATS login and TLS, HTTPS: the fields of :class:`NatsClientSettings` (docs/security.md)."""

    model_config = SettingsConfigDict(env_prefix="BATON_ROUTING_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/routing.db"
    migrate_on_start: bool = Field(
        default=True,
        description="Migrate the database to head at start (embedded default). False in production, where "
        "`baton migrate` runs once before the replicas start and they only check the database is at head.",
    )
    catalog_path: str = Field(default="deploy/catalog.yaml", description="The department catalog (YAML).")
    http_host: str = "127.0.0.1"
    http_port: int = 8102
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
    catalog_poll_interval: float = Field(
        default=2.0, ge=0, description="Seconds between checks of the catalog file for changes (0: never reload)."
    )
    warning_fraction: float = Field(
        default=0.75, gt=0, lt=1, description="sla_warning when a clock has used this fraction of its target."
    )
    max_hops: int = Field(default=4, ge=1, description="handoff_loop_detected when a request has more handoffs.")
    quick_reassign_within: float = Field(
        default=600.0,
        ge=0,
        description="Seconds: a reassignment this soon after accepting is reported as a handoff loop.",
    )
    reconcile_interval: float = Field(
        default=5.0, gt=0, description="Seconds between re-scheduling timers whose schedule did not reach NATS."
    )
    overdue_grace: float = Field(
        default=60.0,
        gt=0,
        description="Seconds after which a timer that should have fired, and was not acted on, is armed again.",
    )
    log_level: str = "INFO"
