"""Fixtures for the e2e scenarios: the guarded cluster (e2e/guard.py) and one ClusterStory the scenarios share.

The scenarios are steps of one story, in file order, on one namespace (quantrol-demo, deleted and re-created at
the start): calibration first, then the W8A8 rollout, then the FP8_DYNAMIC regression on top of it. A step whose
predecessor did not get there skips, naming it. What the story saw stays in e2e/.state/last-run/ (the recorder's
timeline and, at the end, the status of every object and pod) and the objects stay in the cluster until the next
run or `bash e2e/kind-down.sh`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from e2e.guard import Cluster, check_cluster, require_cluster
from quantrol_dev.demo.cluster import ClusterStory, ClusterTarget
from quantrol_dev.demo.story import DemoError, DemoSettings

E2E = Path(__file__).resolve().parent
OUTPUT = E2E / ".state" / "last-run"
# Each wait is bounded: engines pull nothing (kind-up.sh loaded the images), but a first vLLM CPU start compiles.
PHASE_TIMEOUT = 900.0

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One verdict for the whole suite before anything runs (e2e/guard.py): without a reachable e2e cluster every
    scenario skips with the same reason, which pytest's summary prints as one line; a context that kind-up.sh did
    not make stops the session here, before a single request reaches it."""
    scenarios = [item for item in items if item.path.is_relative_to(E2E)]
    if not scenarios:
        return
    verdict = check_cluster()
    if isinstance(verdict, str):
        for item in scenarios:
            item.add_marker(pytest.mark.skip(reason=verdict))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return require_cluster()


@pytest.fixture(scope="module")
def story(cluster: Cluster) -> Iterator[ClusterStory]:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings(output=OUTPUT, phase_timeout=PHASE_TIMEOUT, quiet=True)
    story = ClusterStory(settings, ClusterTarget(), context=cluster.context, kubeconfig=cluster.kubeconfig)
    try:
        step(story, "checking that the operator is installed", story.preflight)
        step(story, "resetting the namespace", story.reset)
        yield story
    finally:
        with contextlib.suppress(Exception):
            (OUTPUT / "describe.txt").write_text(story.describe() + "\n")
        story.close()


def step(story: ClusterStory, what: str, action: Callable[[], T]) -> T:
    """Run one step of the story; a DemoError (a bounded wait ran out, a pod failed) fails the test with the
    reason and the state of the policy, the models and the pods (`quantrol status`)."""
    try:
        return action()
    except DemoError as exc:
        failure = f"{what}: {exc}\n\n{story.describe()}"
    pytest.fail(failure, pytrace=False)  # outside the except block: no "during handling…" chain in the report
