"""Normalizers: pure functions from a raw envelope to canonical messages, one module per channel family."""
