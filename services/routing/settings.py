"""Routing's settings, read from ``BATON_ROUTING_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RoutingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_ROUTING_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/routing.db"
    catalog_path: str = Field(default="deploy/catalog.yaml", description="The department catalog (YAML).")
    http_host: str = "127.0.0.1"
    http_port: int = 8102
    fetch_batch: int = Field(default=64, ge=1, le=1000, description="Messages fetched per pull request.")
    fetch_timeout: float = Field(default=0.05, gt=0, description="Seconds to wait for a batch to fill.")
    retry_delay: float = Field(
        default=2.0,
        gt=0,
        description="First redelivery delay of a failed message; doubled per delivery, capped at 30 s.",
    )
    graceful_timeout: float = Field(default=15.0, gt=0, description="Seconds to drain in-flight work on SIGTERM.")
    log_level: str = "INFO"
