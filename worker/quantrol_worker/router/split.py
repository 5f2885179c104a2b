"""Which arm serves a request, and whether it is mirrored: pure functions of the weights and a point in [0, 1).

The point is either random (no sticky key) or a hash of the sticky key. Arms occupy consecutive intervals of
[0, 1) in a fixed order, candidate first: raising the candidate's weight only moves keys from stable to candidate,
never the other way, so a conversation that a canary step moved to the candidate is not bounced back and forth
as the weight climbs (and a rollback to weight 0 moves every key to stable).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from quantrol_worker.router.config import ArmName

# Fixed order of the intervals; see the module docstring for why the candidate comes first.
ORDER: tuple[ArmName, ...] = ("candidate", "stable")


def sticky_point(key: str) -> float:
    """A uniform point in [0, 1) from a key: 8 bytes of BLAKE2b, so it is stable across processes and restarts
    (Python's hash() is salted per process, which would make two router replicas disagree)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_arm(weights: Mapping[ArmName, int], point: float) -> ArmName:
    """The arm whose interval contains `point`; weights are relative (need not sum to 100)."""
    total = sum(max(0, weights.get(arm, 0)) for arm in ORDER)
    if total <= 0:
        return "stable"  # nothing configured to take traffic: stable is the safe default
    edge = 0.0
    for arm in ORDER:
        edge += max(0, weights.get(arm, 0)) / total
        if point < edge:
            return arm
    return ORDER[-1] if weights.get(ORDER[-1], 0) > 0 else _last_positive(weights)


def _last_positive(weights: Mapping[ArmName, int]) -> ArmName:
    # Floating-point edge: point within rounding of 1.0 and the last arm has weight 0.
    for arm in reversed(ORDER):
        if weights.get(arm, 0) > 0:
            return arm
    return "stable"


def should_mirror(arm: ArmName, mirror_fraction: float, point: float) -> bool:
    """Mirror only stable traffic (the candidate's live requests have nothing to be compared against)."""
    return arm == "stable" and point < mirror_fraction
