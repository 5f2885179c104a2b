"""`quantrol`: the user's command line: CRDs, validation and status; other packages add subcommands (the
development package adds `quantrol demo`) through the `quantrol.cli` entry-point group."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from quantrol_operator import crdgen
from quantrol_operator.validation import validate_object

PLUGIN_GROUP = "quantrol.cli"


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


def _cmd_status(args: argparse.Namespace) -> int:
    from quantrol_operator.api import KINDS_BY_NAME
    from quantrol_operator.cli.statusview import RENDERERS
    from quantrol_operator.kube import Kube

    kind_name, _, name = args.target.partition("/")
    kind = KINDS_BY_NAME.get(kind_name.lower())
    if kind is None or not name:
        print(f"expected sp/NAME or qm/NAME, got {args.target!r}", file=sys.stderr)
        return 2
    kube = Kube.from_kubeconfig(args.kubeconfig)
    obj = kube.get(kind.api_version, kind.kind, args.namespace or kube.namespace, name)
    if obj is None:
        print(f"{kind.kind} {args.namespace or kube.namespace}/{name} not found", file=sys.stderr)
        return 1
    print(RENDERERS[kind.kind](obj))
    return 0


def _cmd_missing(args: argparse.Namespace) -> int:
    print(f"quantrol {args.command}: not installed here; it lives in Quantrol's development package "
          "(from a checkout: `bash .ci/demo`, or `pip install -e devstack`)", file=sys.stderr)
    return 2


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

    registered = set()
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(sub)
        registered.add(plugin.name)
    if "demo" not in registered:
        missing = sub.add_parser("demo", help="(development package not installed)")
        missing.set_defaults(func=_cmd_missing)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
