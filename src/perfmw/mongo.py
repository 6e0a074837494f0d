"""pymongo listeners (placeholder until the MongoDB source lands)."""

from __future__ import annotations


def register_listeners() -> None:
    return None
