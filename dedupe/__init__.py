"""Idempotency, customer identity linking, thread assignment and duplicate merging."""
