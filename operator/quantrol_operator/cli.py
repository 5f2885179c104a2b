"""`quantrol`: the user's command line: CRDs, validation, status, and the demo."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import yaml

from quantrol_operator import crdgen
from quantrol_operator.validation import validate_object

# CI runs `bash .ci/demo` exactly as the README writes it; this variable is its one switch (dwell times only).
REDUCED_ENV = "QUANTROL_DEMO_REDUCED"


def _cmd_crds(args: argparse.Namespace) -> int:
    if args.check:
        stale = crdgen.drifted(Path(args.check))
        for name in stale:
            print(f"{args.check}/{name} differs from the API models; run `quantrol crds --write {args.check}`")
        return 1 if stale else 0
    if args.write:
        for path in crdgen.write_all(Path(args.write)):
            print(f"wrote {path}")
        return 0
    print("---\n".join(crdgen.render_all().values()), end="")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failures = 0
    for filename in args.files:
        with open(filename) as handle:
            documents = [doc for doc in yaml.safe_load_all(handle) if doc]
        for doc in documents:
            name = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
            errors = validate_object(doc)
            for error in errors:
                print(f"{filename}: {name}: {error}", file=sys.stderr)
            if errors:
                failures += 1
            else:
                print(f"{filename}: {name}: valid")
    return 1 if failures else 0


def _configured_context(kubeconfig: str | None) -> str | None:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.quick:
        from quantrol_operator.demo import run_demo  # starts servers; imported only when asked for

        return run_demo(output)
    from quantrol_operator.demo_story import DemoSettings

    context = _configured_context(args.kubeconfig)
    if args.cluster:
        from quantrol_operator.demo_cluster import run_cluster_demo

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
    from quantrol_operator.demo_story import run_demo as run_story

    settings = DemoSettings.reduced(output) if args.reduced else DemoSettings(output=output)
    settings = settings.with_kernel_policy(args.kernel_policy)
    return run_story(output, settings)


def _cmd_status(args: argparse.Namespace) -> int:
    from kubernetes import client, config

    from quantrol_operator.statusview import render_quantizedmodel, render_servingpolicy

    kind, _, name = args.target.partition("/")
    plural, render = {"sp": ("servingpolicies", render_servingpolicy),
                      "servingpolicy": ("servingpolicies", render_servingpolicy),
                      "qm": ("quantizedmodels", render_quantizedmodel),
                      "quantizedmodel": ("quantizedmodels", render_quantizedmodel)}.get(kind.lower(), ("", None))
    if render is None or not name:
        print(f"expected sp/NAME or qm/NAME, got {args.target!r}", file=sys.stderr)
        return 2
    api_client = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    contexts = config.list_kube_config_contexts(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    namespace = args.namespace or contexts[1]["context"].get("namespace", "default")
    obj = cast(dict[str, Any], client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "quantrol.io", "v1alpha1", namespace, plural, name))
    print(render(obj))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantrol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions (generated from the API models)")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR instead of printing")
    crds.add_argument("--check", metavar="DIR", help="exit 1 if the CRDs in DIR differ from the models")
    crds.set_defaults(func=_cmd_crds)

    validate = sub.add_parser("validate", help="check QuantizedModel/ServingPolicy YAML as the API server would")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=_cmd_validate)

    status = sub.add_parser("status", help="a ServingPolicy or QuantizedModel at a glance (also: kubectl quantrol)")
    status.add_argument("target", metavar="sp/NAME|qm/NAME")
    status.add_argument("-n", "--namespace", default=None)
    status.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    status.set_defaults(func=_cmd_status)

    demo = sub.add_parser(
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
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
