"""The rooms are kept by tests, not by good intentions.

- import-linter (`lint-imports`, contracts in pyproject.toml): the operator's layers (api ← children/rollout ←
  planning/kube ← observe ← apply/delivery ← handlers/cli), the shipped packages never importing the development
  package, the operator and the worker's contracts free of torch and vLLM, and no cycles between siblings;
- no two classes in the shipped packages share a name (one name, one meaning);
- the operator image holds the product only: its Dockerfile copies neither the development package nor tests, and
  the operator package has no local-stack or demo module.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = (ROOT / "operator" / "quantrol_operator", ROOT / "worker" / "quantrol_worker")


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout), result.stdout[-2000:]


def test_no_two_classes_in_the_shipped_packages_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for package in PRODUCT:
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    where[node.name].append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert shared == {}, shared


def _copied(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_the_operator_image_holds_the_product_only() -> None:
    copied = _copied(ROOT / "operator" / "Dockerfile")
    assert "operator/" in copied and "worker/" in copied, copied
    assert not any(path.startswith(("devstack", "tests", "e2e", "bench", ".")) and path != ".ci/locks/dev.txt"
                   for path in copied), copied
    dev_only = [p.relative_to(ROOT).as_posix() for p in PRODUCT[0].rglob("*.py")
                if re.search(r"localstack|demo|standin|rig\b", p.as_posix())]
    assert dev_only == [], dev_only
