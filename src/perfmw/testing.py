"""Helpers for the application's own tests.

with perfmw.testing.assert_max_queries(3):
    client.get("/servers")
"""

from __future__ import annotations

# --- assert_max_queries (MongoDB source) ---

# --- forbid_blocking (event loop source) ---
