"""How fast the SLO loop reacts, and how often it cries wolf, at the default analysis policy.

1. Breach onset → 100% of live traffic on stable: the candidate (at its first canary step) starts failing half
   its requests; the clock stops when the router itself reports candidate weight 0. Over N trials: median, max.
2. False rollbacks: a healthy candidate whose latency jitters ±30% around the stable arm's, for M minutes at
   one canary step (a very long dwell keeps it there); every rollback counted.

The same real parts as tests/test_control_loop.py (operator as `kopf run`, router process, engine stand-ins,
Prometheus scraping at 1 s, the client fleet: GuideLLM at 20 requests/s); the analysis uses the defaults of the API
(interval 5 s, window 60 s, failure limit 3, success streak 3, 20 requests minimum). Figures are printed, never
asserted.

    source .venvs/env.sh && .venvs/dev/bin/python bench/bench_control_loop.py --trials 5 --healthy-minutes 10
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from quantrol_dev.localstack.kubeapi import KubeAPIServer
from quantrol_dev.localstack.prometheus import start_prometheus
from quantrol_dev.rig import create_policy, load, open_rig, policy_manifest
from quantrol_operator.kube import Kube


def default_analysis_policy(name: str, namespace: str, prometheus: str, dwell: int) -> dict[str, Any]:
    policy = policy_manifest(name, namespace, prometheus, first_dwell=dwell)
    policy["spec"]["analysis"] = {"prometheus": {"address": prometheus}}  # every other analysis field: defaults
    policy["spec"]["slos"] = {}  # the API's default SLOs
    return policy


# The default policy asks for candidate goodput ≥ stable goodput: a candidate exactly as fast as stable fails that
# half the time on noise alone, and rightly has no claim to be promoted. The healthy candidate here is what a
# useful lower-bit artifact is: about 20% faster per token.
STABLE_TOKEN_S, CANDIDATE_TOKEN_S = 0.02, 0.016


def breach_trial(rig: Any, prometheus: str) -> float:
    rig.behave("stable", token_latency_s=STABLE_TOKEN_S)
    rig.behave("candidate", token_latency_s=CANDIDATE_TOKEN_S)
    with load(rig, rps=20, seconds=300):
        create_policy(rig, default_analysis_policy(rig.policy, rig.namespace, prometheus, dwell=3600))
        rig.wait_phase("Canary", timeout=180)
        time.sleep(5)
        onset = time.monotonic()
        rig.behave("candidate", error_rate=0.5)
        while time.monotonic() - onset < 120:
            if rig.router_weights().get("candidate", 0.0) == 0.0 and rig.status().get("phase") == "RolledBack":
                return time.monotonic() - onset
            time.sleep(0.2)
    raise RuntimeError(f"no rollback within 120 s: {rig.status().get('lastAnalysis')}")


def healthy_run(rig: Any, prometheus: str, minutes: float) -> tuple[int, int]:
    rig.behave("stable", token_latency_s=STABLE_TOKEN_S)
    rig.behave("candidate", token_latency_s=CANDIDATE_TOKEN_S)
    stop = threading.Event()

    def jitter() -> None:
        rng = random.Random(7)
        while not stop.wait(2.0):
            rig.behave("candidate", token_latency_s=CANDIDATE_TOKEN_S * rng.uniform(0.7, 1.3))

    thread = threading.Thread(target=jitter, daemon=True)
    with load(rig, rps=20, seconds=minutes * 60 + 120):
        # The longest dwell the API accepts: the rollout stays at its first canary step for the whole run.
        create_policy(rig, default_analysis_policy(rig.policy, rig.namespace, prometheus, dwell=604_800))
        if rig.wait_phase("Canary", "RolledBack", timeout=180).get("phase") == "RolledBack":
            return 1, len(rig.status().get("history", []))  # rolled back in Shadow, before any jitter: counted too
        thread.start()
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end and rig.status().get("phase") != "RolledBack":
            time.sleep(5)
    stop.set()
    status = rig.status()
    return int(status.get("phase") == "RolledBack"), len(status.get("history", []))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--healthy-minutes", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quantrol-bench-") as tmp:
        root = Path(tmp)
        kubeapi = KubeAPIServer(root / "kubeapi", crds_dir=Path(__file__).resolve().parent.parent / "crds").start()
        prometheus = start_prometheus(workdir=root / "prometheus")
        kubeconfig = kubeapi.write_kubeconfig()
        kube = Kube.from_kubeconfig(str(kubeconfig))
        try:
            delays = []
            for trial in range(args.trials):
                ns = f"breach-{trial}"
                kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
                with open_rig(kubeapi, kubeconfig, ns, prometheus, root / ns) as rig:
                    delays.append(breach_trial(rig, prometheus.url))
                print(f"trial {trial + 1}: breach onset → 100% on stable in {delays[-1]:.1f} s", flush=True)
            false_rollbacks, transitions = 0, 0
            if args.healthy_minutes > 0:
                kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "healthy"}})
                with open_rig(kubeapi, kubeconfig, "healthy", prometheus, root / "healthy") as rig:
                    false_rollbacks, transitions = healthy_run(rig, prometheus.url, args.healthy_minutes)
        finally:
            prometheus.stop()
            kubeapi.stop()
    print()
    print("default policy: interval 5 s, window 60 s, failure limit 3, Prometheus scrape 1 s")
    if delays:
        print(f"breach → stable: median {statistics.median(delays):.1f} s, max {max(delays):.1f} s "
              f"over {len(delays)} trials (goal ≤ 15 s; Flagger's defaults: interval 60 s × threshold 5 ≈ 300 s)")
    if args.healthy_minutes > 0:
        print(f"healthy ±30% jitter for {args.healthy_minutes:g} min: {false_rollbacks} false rollbacks "
              f"({transitions} transitions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
