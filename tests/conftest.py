"""Shared fixtures. The servers of the local stack live in tests/plugins/, one module per server family."""

pytest_plugins = [
    "tests.plugins.kubeapi",
    "tests.plugins.servers",
    "tests.plugins.runner",
]
