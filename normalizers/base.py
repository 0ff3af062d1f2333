"""The normalizer contract.

A normalizer is a pure, synchronous function: no I/O, no clock, no randomness. It raises
:class:`core.errors.InvalidInput` for a request the sender must fix (nothing is stored, the
channel answers 4xx) and :class:`core.errors.NormalizationError` for a verified message it cannot
understand (the message is quarantined with its raw bytes, and the channel answers success).
"""

from __future__ import annotations

from core.channel import Normalizer

__all__ = ["Normalizer"]
