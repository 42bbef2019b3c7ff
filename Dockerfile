# One image for every Baton service: `python -m services.<name>` picks the service.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY baton ./baton
COPY deploy/catalog.yaml ./deploy/catalog.yaml
RUN pip install -c requirements.lock . && useradd --system --uid 10001 baton \
    # NATS users written by `baton nats-config` (compose: the nats-auth volume, owned by baton)
    && install -d -o baton -m 0700 /var/lib/baton/nats
USER baton
EXPOSE 8080
# Overridden per service in docker-compose.yml / the Kubernetes manifests.
CMD ["python", "-m", "services.intake"]
