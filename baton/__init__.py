"""Baton: departments hand requests to each other as events over NATS JetStream."""
