"""A service registry (servers and their agents) on MongoDB, instrumented by perfmw."""
