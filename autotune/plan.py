"""The sweep: which (op, backend, dtype, n, C, token bucket) entries a run tunes.

Planning needs no GPU and no data: each entry is judged on a fabricated call
(:func:`.inputs.fabricate_call`), so ``mhc-kernels autotune --dry-run`` can show,
anywhere, how many configs each kernel declares and how many survive pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from mhc_kernels import registry, tuned
from mhc_kernels.specs import SPECS

from . import space as space_mod
from .inputs import fabricate_call

TUNABLE_BACKENDS = ("tilelang", "triton")   # the reference has no configs
DEFAULT_TOKENS = tuple(4 ** i for i in range(9))   # 1, 4, 16, ..., 65536
DEFAULT_HIDDEN = (4096, 7168)
DEFAULT_N = (4,)


@dataclass
class Entry:
    """One store entry to tune (sizes as the store keys them)."""

    op: str
    backend: str
    kernel: object
    dtype: torch.dtype        # the call's kernel dtype (float32 for ops without a residual)
    act_dtype: torch.dtype    # the residual dtype to build inputs with
    n: int
    C: int
    T: int
    key: str
    pruned: Optional[space_mod.Pruned] = None


@dataclass
class KernelPlan:
    """What the sweep does with one (op, backend)."""

    op: str
    backend: str
    note: str = ""                  # why nothing is tuned, if so
    entries: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)   # (shape text, reason)


def all_ops() -> list[str]:
    return list(SPECS)


def plan(ops: Iterable[str], backends: Iterable[str], dtypes: Iterable[torch.dtype], ns: Iterable[int],
         hidden: Iterable[int], tokens: Iterable[int], arch: int, target="cuda") -> list[KernelPlan]:
    """Every entry of the sweep, grouped by (op, backend), with the pruned config space of each."""
    out = []
    dtypes, ns, hidden, tokens = list(dtypes), list(ns), list(hidden), list(tokens)
    for backend in backends:
        why = registry.unavailable_reason(backend, target)
        for op in ops:
            kp = KernelPlan(op, backend)
            out.append(kp)
            if why is not None:
                kp.note = why
                continue
            kernel = registry.get_kernel(op, backend)
            if kernel is None:
                kp.note = "no kernel registered yet"
                continue
            if kernel.config_space is None:
                kp.note = "no config space (a composition: its parts are tuned as their own ops)"
                continue
            seen = set()
            for dtype in dtypes:
                for n in ns:
                    for C in hidden:
                        for T in tokens:
                            call = fabricate_call(op, T, n, C, dtype, target)
                            key = tuned.entry_key(op, backend, call.dtype, call.n or 1, call.C or 1, call.T)
                            if key in seen:  # ops without a residual do not depend on C or the dtype
                                continue
                            seen.add(key)
                            reason = kernel.reason_unsupported(call)
                            if reason is not None:
                                kp.unsupported.append((key, reason))
                                continue
                            e = Entry(op, backend, kernel, call.dtype, dtype, call.n or 1, call.C or 1, call.T, key)
                            e.pruned = space_mod.prune(kernel, call, space_mod.enumerate_space(kernel, call), arch)
                            kp.entries.append(e)
    return out


def summarize_reasons(entries: list[Entry], top: int = 3) -> str:
    """The most common pruning reasons over ``entries`` (numbers stripped so similar reasons group)."""
    import re

    counts: dict[str, int] = {}
    for e in entries:
        for _, why in e.pruned.dropped:
            k = re.sub(r"\d+", "#", why)
            counts[k] = counts.get(k, 0) + 1
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{k} (x{v})" for k, v in items)
