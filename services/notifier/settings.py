"""Notifier's settings, read from ``BATON_NOTIFIER_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NotifierSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_NOTIFIER_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:14222", description="Comma-separated NATS server URLs.")
    database_url: str = "sqlite+aiosqlite:///.baton/data/notifier.db"
    catalog_path: str = Field(default="deploy/catalog.yaml", description="The department catalog (YAML).")
    http_host: str = "127.0.0.1"
    http_port: int = 8103
    fetch_batch: int = Field(default=64, ge=1, le=1000, description="Messages fetched per pull request.")
    fetch_timeout: float = Field(default=0.05, gt=0, description="Seconds to wait for a batch to fill.")
    retry_delay: float = Field(default=2.0, gt=0, description="Seconds before a failed message is redelivered.")
    gap_delay: float = Field(
        default=0.5,
        gt=0,
        description="First redelivery delay of an event that arrived before an earlier one of its request; "
        "doubles on every further delivery up to gap_max_delay.",
    )
    gap_max_delay: float = Field(default=30.0, gt=0, description="Longest redelivery delay of an out-of-order event.")
    graceful_timeout: float = Field(default=15.0, gt=0, description="Seconds to drain in-flight work on SIGTERM.")
    log_level: str = "INFO"
