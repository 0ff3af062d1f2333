"""Shared test helpers: RabbitMQ access, a cuttable TCP proxy, a consumer, the event schema."""
