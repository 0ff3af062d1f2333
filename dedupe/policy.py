"""What thread assignment needs from the settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPolicy:
    """What thread assignment needs from the settings, resolved per message by the pipeline."""

    window: float  # seconds since the thread's last activity within which a message joins it
    ticket_ref_pattern: str | None = None
    # Duplicate touchpoints: the same text from the same customer through another channel.
    duplicate_window: float = 900.0  # seconds; 0 turns detection off
    duplicate_threshold: float = 90.0  # rapidfuzz ratio (0..100) on normalised text
    duplicate_min_chars: int = 12  # shorter normalised texts are never duplicates
