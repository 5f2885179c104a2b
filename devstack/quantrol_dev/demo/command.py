"""`quantrol demo`, registered with the product CLI through the `quantrol.cli` entry point of this package."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

# CI runs `bash .ci/demo` exactly as the README writes it; this variable is its one switch (dwell times only).
REDUCED_ENV = "QUANTROL_DEMO_REDUCED"


def configured_context(kubeconfig: str | None) -> str | None:
    """The current context of the kubeconfig a client would use, or None when there is none."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not any(os.path.isfile(p) for p in path.split(os.pathsep)):
        return None
    from kubernetes import config

    try:
        _, current = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
    except Exception:  # no usable context in it: as good as none
        return None
    return str(current["name"]) if current else None


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.quick:
        from quantrol_dev.demo.quick import run_demo  # starts servers; imported only when asked for

        return run_demo(output)
    from quantrol_dev.demo.story import DemoSettings

    context = configured_context(args.kubeconfig)
    if args.cluster:
        from quantrol_dev.demo.cluster import run_cluster_demo

        # A cluster pulls images and schedules pods, too: longer phase timeouts than on the local stack.
        base = DemoSettings.reduced(output) if args.reduced else DemoSettings(output=output)
        cluster = replace(base, phase_timeout=900.0).with_kernel_policy(args.kernel_policy)
        return run_cluster_demo(output, context=args.context or context, settings=cluster)
    if not args.local and context:
        # Never act on a real cluster by surprise: the person says which they mean.
        print(f"quantrol demo: a cluster is configured (kube context {context!r}); run `quantrol demo --local` for "
              "the embedded stack (nothing touches that cluster), or `quantrol demo --cluster` to run the story "
              "there with the installed chart", file=sys.stderr)
        return 2
    from quantrol_dev.demo.story import run_demo as run_story

    settings = DemoSettings.reduced(output) if args.reduced else DemoSettings(output=output)
    settings = settings.with_kernel_policy(args.kernel_policy)
    return run_story(output, settings)


def register(commands: argparse._SubParsersAction[Any]) -> None:
    demo = commands.add_parser(
        "demo", help="the whole story, for real: calibrate, publish, shadow, canary, promote, roll back",
        description="With no cluster configured (or with --local): the embedded stack (Kubernetes API emulation, "
                    "Prometheus, OCI registry, a local workload runner) runs the operator's Jobs and vLLM CPU "
                    "arms as processes. With --cluster: the same story on the current kube context, through "
                    "the installed chart.")
    where = demo.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="the embedded stack, even when a cluster is configured")
    where.add_argument("--cluster", action="store_true", help="the current kube context, with the chart installed")
    where.add_argument("--quick", action="store_true",
                       help="only check the embedded stack (API, operator, registry, validation): about 30 s")
    demo.add_argument("--output", default="out/demo", help="where the report, the chart and the logs go")
    demo.add_argument("--kernel-policy", choices=("warn", "enforce"), default="warn",
                      help="warn (default): FP8_DYNAMIC, a fallback on CPU, faces the SLOs and the latency SLO "
                           "rolls it back; enforce: it is refused as KernelFallback before it takes traffic")
    demo.add_argument("--reduced", action="store_true", default=os.environ.get(REDUCED_ENV, "") not in ("", "0"),
                      help=f"shorter dwell times, nothing else (as in CI; also set by {REDUCED_ENV}=1)")
    demo.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    demo.add_argument("--context", default=None, help="with --cluster: the kube context (default: the current)")
    demo.set_defaults(func=run)
