"""Sinks: they read finished records and findings and export them; they never measure."""
