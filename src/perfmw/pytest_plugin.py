"""pytest plugin for perfmw (markers and fixtures for applications' tests)."""
