"""Scenarios against a real cluster (e2e/README.md); `pytest` alone never collects them (testpaths: tests)."""
