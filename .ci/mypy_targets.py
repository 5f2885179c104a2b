"""Lists which worker modules mypy can check in the running environment, for .ci/test's per-environment runs.

Run with an environment's own interpreter: `python .ci/mypy_targets.py`. Prints one line per module of
worker/quantrol_worker: `ok<TAB>path` when every third-party module it imports (lazy imports inside functions and
`if TYPE_CHECKING:` blocks included, as mypy reads them) resolves here, `no<TAB>path<TAB>reason` when not.
Its imports of other worker modules do not count: .ci/test runs mypy with --follow-imports=silent, so a module that
lazily imports another environment's code (the worker's CLI dispatching to calibrate or route) is still checked,
against what that code declares.

Why not a hand-kept list: the worker's torch-free modules (config and report contracts, router, fetch) resolve in
every environment, its calibration modules only where torch and llm-compressor are, its serving ones only where vLLM
is. Deciding from the imports themselves needs no list to keep up to date, nothing is imported (vLLM takes seconds),
and a module that resolves nowhere (a typo, or two environments' libraries in one module) is caught by .ci/test.
A module counts as resolvable when it is installed here, is in the standard library, or is covered by an
`ignore_missing_imports` override in pyproject.toml (mypy then types it as Any rather than failing).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "worker"
PACKAGE = "quantrol_worker"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of everything the module imports; `from a import b` yields both `a` and `a.b`."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def ignored_by_config() -> list[str]:
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("mypy", {})
    if mypy.get("ignore_missing_imports"):
        return ["*"]
    patterns: list[str] = []
    for override in mypy.get("overrides", []):
        if override.get("ignore_missing_imports"):
            modules = override.get("module", [])
            patterns += [modules] if isinstance(modules, str) else modules
    return patterns


def resolvable(top: str, ignored: list[str]) -> bool:
    if top in sys.stdlib_module_names or importlib.util.find_spec(top) is not None:
        return True
    # mypy's override patterns: "torch.*" covers torch and its submodules, "torch" only torch itself.
    return any(p == "*" or fnmatch.fnmatchcase(top, p) or p == f"{top}.*" for p in ignored)


def main() -> int:
    ignored = ignored_by_config()
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        tops = {n.split(".")[0] for n in imported_names(path, module_name(path)) if n}
        missing = sorted(t for t in tops if t != PACKAGE and not resolvable(t, ignored))
        rel = path.relative_to(ROOT)
        print(f"no\t{rel}\tneeds {', '.join(missing)}" if missing else f"ok\t{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
