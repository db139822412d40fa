"""What the Triton op modules share: the interpreter flag and the autotune switch.

Imported only by the `triton_<op>.py` modules, which `leader_edge.kernels` loads lazily, so
importing the package never imports triton.
"""

from __future__ import annotations

import os

import triton

# `@triton.jit` reads TRITON_INTERPRET when a kernel is decorated, i.e. when the op module is first
# imported: kernels decorated without it cannot take CPU tensors for the rest of the process.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# LEADER_EDGE_AUTOTUNE=0 pins every kernel to its first config: tests use it (one compile per shape
# instead of one per config), and the interpreter always does (timing it would measure Python).
AUTOTUNE: bool = os.environ.get("LEADER_EDGE_AUTOTUNE", "1") != "0" and not INTERPRETED


def autotune_configs(configs: list[triton.Config], pinned: triton.Config) -> list[triton.Config]:
    """`configs` when autotuning is on, else `[pinned]` (the Autotuner skips benchmarking a single config)."""
    return configs if AUTOTUNE else [pinned]
