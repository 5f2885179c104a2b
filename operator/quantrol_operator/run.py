"""`quantrol-operator`: `kopf run` with Quantrol's handlers; every argument is passed on to `kopf run`.

quantrol-operator --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz --verbose
quantrol-operator -n team-a -n team-b
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import kopf.cli

from quantrol_operator.handlers.settings import SCOPE_ENV

HANDLERS_MODULE = "quantrol_operator.handlers"


def describe_scope(args: Sequence[str]) -> str:
    """Which namespaces `kopf run` will watch with these arguments (kopf's own parser reads them)."""
    context = kopf.cli.run.make_context("quantrol-operator", list(args), resilient_parsing=True)
    namespaces = list(context.params.get("namespaces") or ())
    if namespaces and not context.params.get("clusterwide"):
        return "namespaces " + ", ".join(namespaces)
    return "all namespaces"  # kopf also falls back to cluster-wide when given neither flag


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ[SCOPE_ENV] = describe_scope(args)
    kopf.cli.main(args=["run", "--module", HANDLERS_MODULE, *args], prog_name="quantrol-operator")


if __name__ == "__main__":
    main()
