"""Shared fixtures. The servers of the local stack live in tests/plugins/, one module per server family."""

from hypothesis import settings

pytest_plugins = [
    "tests.plugins.kubeapi",
    "tests.plugins.servers",
    "tests.plugins.runner",
]

# Hypothesis' per-example deadline is a timing assertion: on a shared 2-core machine (CI, or a laptop running the
# local stack) a CEL evaluation can take 300 ms one run and 30 ms the next. Speed is measured in bench/, not here.
settings.register_profile("quantrol", deadline=None)
settings.load_profile("quantrol")
