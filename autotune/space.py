"""Config spaces: enumerate a kernel's candidates for one call and prune those that cannot work.

A kernel (:class:`mhc_kernels.registry.Kernel`) declares its space with
``config_space(call) -> list[dict]``. Pruning drops, with a reason each:

* duplicates;
* configs over the target architecture's limits, judged from estimates a config
  may carry: ``smem_bytes`` (shared memory per block), ``num_warps`` or
  ``threads`` (threads per block), ``regs_per_thread`` (registers);
* tiles larger than the problem when the same config with the tile clamped to the
  problem (rounded up to a power of two) is also in the space -- they do the same
  work with more masked lanes (keys ``block_T``, ``block_C``, ``block_K``);
* whatever the kernel's own check rejects: ``kernel.check_config(call, config) -> reason
  or None`` (the same check the core applies to a stored config).

A composite's config (a dict of its parts' configs) is judged part by part.

Keys other than the kernel's parameters (the estimates) travel with the config;
the launch wrappers ignore keys they do not use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from mhc_kernels.specs import next_pow2


@dataclass(frozen=True)
class ArchLimits:
    """Per-block limits of one compute capability (CUDA C Programming Guide, compute capabilities table)."""

    smem_per_block: int        # bytes, opt-in maximum of dynamic shared memory per block
    regs_per_sm: int = 65536   # 32-bit registers per SM (and per block)
    max_regs_per_thread: int = 255
    max_threads: int = 1024


_KIB = 1024
ARCH_LIMITS = {
    80: ArchLimits(163 * _KIB),   # A100
    86: ArchLimits(99 * _KIB),
    87: ArchLimits(163 * _KIB),
    89: ArchLimits(99 * _KIB),    # L4, L40
    90: ArchLimits(227 * _KIB),   # H100, H200
    100: ArchLimits(227 * _KIB),  # B200
    103: ArchLimits(227 * _KIB),
    120: ArchLimits(99 * _KIB),
}
DEFAULT_ARCH = 90


def limits_for(arch: int) -> ArchLimits:
    """Limits of ``arch`` (e.g. 90); an unknown one gets those of the nearest lower known arch."""
    known = sorted(ARCH_LIMITS)
    lower = [a for a in known if a <= arch]
    return ARCH_LIMITS[lower[-1] if lower else known[0]]


def device_arch(device=None) -> Optional[int]:
    """``major*10 + minor`` of a CUDA device (default: the current one), or ``None`` for any other."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _size(call, name: str) -> Optional[int]:
    if name == "K":
        return None if call.n is None or call.C is None else call.n * call.C
    return getattr(call, name, None)


def why_pruned(kernel, call, config: dict, arch: int) -> Optional[str]:
    """Why ``config`` cannot run ``call`` on ``arch``, or ``None`` if it may."""
    for part, sub in config.items():  # a composite: each part's config against that part's call
        if isinstance(sub, dict) and part in kernel.parts:
            why = why_pruned(kernel.parts[part], _part_call(kernel, part, call), sub, arch)
            if why is not None:
                return f"{part}: {why}"
    lim = limits_for(arch)
    smem = config.get("smem_bytes")
    if smem is not None and smem > lim.smem_per_block:
        return f"needs {smem} B shared memory per block > {lim.smem_per_block} B on sm_{arch}"
    threads = config.get("threads")
    if threads is None and config.get("num_warps") is not None:
        threads = 32 * config["num_warps"]
    if threads is not None and threads > lim.max_threads:
        return f"{threads} threads per block > {lim.max_threads}"
    regs = config.get("regs_per_thread")
    if regs is not None:
        if regs > lim.max_regs_per_thread:
            return f"{regs} registers per thread > {lim.max_regs_per_thread}"
        if threads is not None and regs * threads > lim.regs_per_sm:
            return f"{regs} registers x {threads} threads > {lim.regs_per_sm} per SM"
    if kernel.check_config is not None:
        return kernel.check_config(call, config)
    return None


def _part_call(kernel, part: str, call):
    from mhc_kernels.composite import COMPOSITES

    return next(p for p in COMPOSITES[kernel.op][1] if p.name == part).call(call)


@dataclass
class Pruned:
    kept: list          # configs that may run
    dropped: list       # (config, reason)

    @property
    def total(self) -> int:
        return len(self.kept) + len(self.dropped)


def enumerate_space(kernel, call) -> list[dict]:
    """The kernel's declared configs for ``call`` (empty for an untunable kernel)."""
    if kernel.config_space is None:
        return []
    return [dict(c) for c in kernel.config_space(call)]


_TILE_SIZES = {"block_T": "T", "block_C": "C", "block_K": "K"}


def _clamped(call, cfg: dict) -> Optional[dict]:
    """``cfg`` with every oversized tile clamped to its problem size (``None`` if none is oversized)."""
    out, changed = dict(cfg), False
    for key, v in cfg.items():
        size_name = _TILE_SIZES.get(key)
        size = _size(call, size_name) if size_name else None
        if size is not None and isinstance(v, int) and not isinstance(v, bool) and v > next_pow2(size):
            out[key], changed = next_pow2(size), True
    return out if changed else None


def _twins(kernel, call, cfg: dict) -> list[dict]:
    """The configs that do ``cfg``'s work with smaller tiles: ``cfg`` clamped, or for a composite ``cfg`` with
    one part's config clamped (against that part's call; the other parts as they are)."""
    if not kernel.parts:
        twin = _clamped(call, cfg)
        return [] if twin is None else [twin]
    out = []
    for part, sub in cfg.items():
        if isinstance(sub, dict) and part in kernel.parts:
            twin = _clamped(_part_call(kernel, part, call), sub)
            if twin is not None:
                out.append(dict(cfg, **{part: twin}))
    return out


def prune(kernel, call, configs: list[dict], arch: int = DEFAULT_ARCH) -> Pruned:
    """Split ``configs`` into those that may run ``call`` on ``arch`` and those that cannot (with reasons)."""
    kept, dropped, seen = [], [], set()
    for cfg in configs:
        ident = config_id(cfg)
        if ident in seen:
            dropped.append((cfg, "duplicate"))
            continue
        seen.add(ident)
        try:
            reason = why_pruned(kernel, call, cfg, arch)
        except Exception as e:  # a broken check rejects, it does not stop the sweep
            reason = f"config check failed: {type(e).__name__}: {e}"
        (kept if reason is None else dropped).append(cfg if reason is None else (cfg, reason))
    # oversized tiles: redundant when their clamped twin survived
    ids = {config_id(c) for c in kept}
    final = []
    for cfg in kept:
        if any(config_id(twin) in ids for twin in _twins(kernel, call, cfg)):
            dropped.append((cfg, "tile larger than the problem (same as a smaller tile)"))
        else:
            final.append(cfg)
    return Pruned(final, dropped)


def config_id(cfg: dict) -> str:
    """A canonical string for a config (equal configs, equal ids)."""
    return json.dumps(cfg, sort_keys=True, default=str)


def format_config(cfg: Optional[dict]) -> str:
    if cfg is None:
        return "-"
    return " ".join(f"{k}={v}" for k, v in cfg.items())
