"""Read vLLM's own log lines for what it decided about kernels. Pure: one line in, zero or one event out.

The patterns are vLLM 0.32's log calls, read from its source and checked against real start-ups on this machine
(tests/test_serve_launcher.py replays the captured lines):
- `model_executor/kernels/linear/__init__.py`: `logger.info_once("Selected %s for %s", kernel, module_name)` for
  scaled-mm (int8 / fp8) and FP8 weight-only kernels; `logger.info_once("Using %s for mixed-precision linear",
  kernel)` for WNA16 kernels; `raise ValueError("Failed to find a kernel that can implement the <KIND> linear
  layer. Reasons: \\n" + reasons)` with one ` <Kernel> cannot implement due to: <why>` line per candidate.
- `layers/quantization/utils/marlin_utils_fp8.py`: the FP8 weight-only Marlin warning ("Your GPU does not have
  native support for FP8 computation ... Weight-only FP8 compression will be used leveraging the Marlin kernel").
- `layers/quantization/kv_cache.py`: "Using KV cache scaling factor 1.0 for fp8_e4m3" when the checkpoint carries
  no k/v scales.
- the API server's "Application startup complete." once it answers requests.

`info_once` means one line per (kernel, module) per process, so every distinct kernel shows up exactly once.
vLLM prefixes lines with `(APIServer pid=N)` / `(EngineCore pid=N)` and a level/time/file header; the patterns
search anywhere in the line so that the prefix format can change without breaking them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class EventKind(StrEnum):
    SELECTED = "selected"  # a scaled-mm / fp8 weight-only kernel picked for a quantization scheme class
    MIXED_PRECISION = "mixed_precision"  # a WNA16 kernel picked
    FP8_WEIGHT_ONLY = "fp8_weight_only"  # FP8 weights served weight-only through Marlin (no native FP8 compute)
    NO_KERNEL = "no_kernel"  # "Failed to find a kernel that can implement the ... linear layer"
    NO_KERNEL_REASON = "no_kernel_reason"  # one candidate's reason, on the lines that follow NO_KERNEL
    KV_SCALE_DEFAULT = "kv_scale_default"  # fp8 KV cache without calibrated k/v scales
    READY = "ready"  # the OpenAI server accepts requests


@dataclass(frozen=True)
class LogEvent:
    kind: EventKind
    kernel: str = ""  # vLLM's kernel class name, when the line names one
    subject: str = ""  # what it serves (the scheme class, e.g. CompressedTensorsW8A8Int8) or the layer kind (WNA16)
    detail: str = ""  # the reason text, for NO_KERNEL_REASON
    line: str = ""


_SELECTED = re.compile(r"\bSelected (?P<kernel>[A-Za-z_]\w*) for (?P<subject>[A-Za-z_][\w.]*)\s*$")
_MIXED = re.compile(r"\bUsing (?P<kernel>[A-Za-z_]\w*) for mixed-precision linear\b")
_FP8_WEIGHT_ONLY = re.compile(r"Weight-only FP8 compression will\s+be used leveraging the Marlin kernel")
_NO_KERNEL = re.compile(r"Failed to find a kernel that can implement the (?P<subject>[\w\- ]+?) linear layer")
_NO_KERNEL_REASON = re.compile(r"\b(?P<kernel>[A-Za-z_]\w*Kernel) cannot implement due to: (?P<why>.*)$")
_KV_SCALE_DEFAULT = re.compile(r"Using KV cache scaling factor 1\.0 for (?P<subject>\w+)")
_READY = re.compile(r"Application startup complete\.")


def parse_line(line: str) -> LogEvent | None:
    """The kernel-relevant event on one log line, or None (most lines)."""
    text = line.rstrip("\r\n")
    # Cheap pre-filter: start-up prints hundreds of lines, only a handful matter.
    if not any(k in text for k in ("Selected ", "Using ", "Weight-only FP8", "Failed to find", "cannot implement",
                                   "Application startup")):
        return None
    if m := _SELECTED.search(text):
        return LogEvent(EventKind.SELECTED, m["kernel"], m["subject"], line=text)
    if m := _MIXED.search(text):
        return LogEvent(EventKind.MIXED_PRECISION, m["kernel"], "mixed-precision", line=text)
    if _FP8_WEIGHT_ONLY.search(text):
        return LogEvent(EventKind.FP8_WEIGHT_ONLY, "MarlinFP8", "fp8-weight-only", line=text)
    if m := _NO_KERNEL.search(text):
        return LogEvent(EventKind.NO_KERNEL, "", m["subject"], line=text)
    if m := _NO_KERNEL_REASON.search(text):
        return LogEvent(EventKind.NO_KERNEL_REASON, m["kernel"], "", m["why"].strip(), line=text)
    if m := _KV_SCALE_DEFAULT.search(text):
        return LogEvent(EventKind.KV_SCALE_DEFAULT, "", m["subject"], line=text)
    if _READY.search(text):
        return LogEvent(EventKind.READY, line=text)
    return None
