"""Types shared across orbiter packages."""

from __future__ import annotations

__all__ = ["OrbiterError"]


class OrbiterError(Exception):
    """Base class of every error raised by orbiter."""
