"""``python -m services.notifier``: run the notifier service."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import NotifierSettings


def main() -> None:
    settings = NotifierSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.graceful_timeout),
    )


if __name__ == "__main__":
    main()
