"""``python -m services.metrics``: run the metrics service."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import MetricsSettings


def main() -> None:
    settings = MetricsSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            timeout_graceful_shutdown=int(settings.graceful_timeout),
            **settings.uvicorn_tls(),  # HTTPS when BATON_*_HTTP_TLS_CERT/_KEY are set
        )
    )
    # Live streams (/v1/live/stream) end as soon as the server starts shutting down.
    app.state.server = server
    server.run()


if __name__ == "__main__":
    main()
