"""Tuned kernel configs: where they live, their file format, and the runtime lookup.

The tuner (``mhc_kernels.autotune``) writes one JSON file per GPU model; this module
only reads them. It is core code, so it imports no backend and no tool, and never
imports triton or tilelang (their versions come from package metadata).

Locations (user wins over bundled, entry by entry):

* bundled configs ship inside the package (``mhc_kernels/autotune/configs/``);
* user configs live in ``$MHC_KERNELS_CONFIG_DIR``, default
  ``$XDG_CACHE_HOME/mhc_kernels/configs`` (``~/.cache/...``).

File format (one file per device, named by :func:`sanitize_device_name`, e.g.
``NVIDIA_H100_80GB_HBM3.json``; CPU tensors use ``cpu.json``, which only tests and the
Triton interpreter ever have)::

    {"schema": 1,
     "device": {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "sm_count": 132},
     "versions": {"torch": "...", "triton": "...", "tilelang": "...", "mhc_kernels": "..."},
     "entries": {"post/triton/bf16/n4/C4096/T16384":
                   {"config": {...}, "us": 9.8, "gbps": 2950.1, "default_us": 11.2,
                    "versions": {"mhc_kernels": "0.1.0", "triton": "3.9.0"}, ...}}}

An entry is valid while the versions it records match the running ones:
``mhc_kernels`` exactly (the config spaces belong to the kernels of that version),
``triton``/``tilelang`` to major.minor (a compiler release can move the optimum).
A corrupt file or one with another schema version is warned about once and reads
as empty: a bad config file never breaks a model, it only costs the tuned speed.

Lookup (:func:`lookup`): the exact token bucket (``T`` rounded up to a power of two),
else the nearest stored bucket (in log2 distance) for the same op, backend, dtype,
``n`` and ``C``, else ``None`` (the kernel uses its default). Files are read once per
process and device; after that a call costs a dict lookup (:func:`clear_cache`
forgets everything, for tests and for the tuner after it writes).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import warnings
from typing import Callable, Optional

from .specs import dtype_name, next_pow2

CONFIG_DIR_ENV = "MHC_KERNELS_CONFIG_DIR"
SCHEMA_VERSION = 1

# the versions an entry depends on, by backend (besides mhc_kernels itself)
BACKEND_TOOLCHAIN = {"triton": "triton", "tilelang": "tilelang"}
_DISTS = {"torch": "torch", "triton": "triton", "tilelang": "tilelang", "mhc_kernels": "mhc-kernels"}



def user_config_dir() -> str:
    d = os.environ.get(CONFIG_DIR_ENV)
    if d:
        return os.path.abspath(os.path.expanduser(d))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mhc_kernels", "configs")


def bundled_config_dir() -> str:
    spec = importlib.util.find_spec("mhc_kernels.autotune")
    return os.path.join(list(spec.submodule_search_locations)[0], "configs")


# -- naming --------------------------------------------------------------------
def sanitize_device_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (a safe file stem)."""
    s = re.sub(r"[^A-Za-z0-9.\-]+", "_", name.strip()).strip("_.")
    return s or "unknown_device"


def token_bucket(T: int) -> int:
    """The bucket a token count tunes and looks up under: ``T`` rounded up to a power of two."""
    return next_pow2(T)


def entry_key(op: str, backend: str, dtype, n: int, C: int, T: int) -> str:
    """Store key, e.g. ``post/triton/bf16/n4/C4096/T16384`` (``T`` is bucketed here)."""
    return f"{op}/{backend}/{dtype_name(dtype)}/n{n}/C{C}/T{token_bucket(T)}"


def split_key(key: str) -> Optional[tuple[str, str, str, int, int, int]]:
    """Inverse of :func:`entry_key`; ``None`` for a malformed key."""
    m = re.fullmatch(r"([^/]+)/([^/]+)/([^/]+)/n(\d+)/C(\d+)/T(\d+)", key)
    if m is None:
        return None
    op, backend, dt, n, C, T = m.groups()
    return op, backend, dt, int(n), int(C), int(T)


# -- device identity and versions -----------------------------------------------
def _device_index(device) -> Optional[int]:
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def device_identity(device) -> dict:
    """``{"name", "capability", "sm_count"}`` of a CUDA device; ``{"name": "cpu", ...}`` otherwise."""
    import torch

    idx = _device_index(device)
    if idx is None:
        return {"name": "cpu", "capability": None, "sm_count": None}
    p = torch.cuda.get_device_properties(idx)
    return {"name": p.name, "capability": [p.major, p.minor], "sm_count": p.multi_processor_count}


def store_filename(device_name: str) -> str:
    return sanitize_device_name(device_name) + ".json"


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def current_versions() -> dict:
    """Installed versions of torch, triton, tilelang and mhc_kernels (``None``: not installed)."""
    out = {k: _dist_version(d) for k, d in _DISTS.items()}
    if out["mhc_kernels"] is None:  # a source checkout that was never installed
        from . import __version__

        out["mhc_kernels"] = __version__
    return out


def entry_versions(backend: str, versions: dict) -> dict:
    """The versions an entry for ``backend`` records (and is invalidated by)."""
    out = {"mhc_kernels": versions.get("mhc_kernels")}
    tool = BACKEND_TOOLCHAIN.get(backend)
    if tool is not None:
        out[tool] = versions.get(tool)
    return out


def _major_minor(v) -> Optional[str]:
    if v is None:
        return None
    return ".".join(str(v).split("+")[0].split(".")[:2])


def entry_is_current(entry: dict, backend: str, versions: dict) -> bool:
    """Whether an entry's recorded versions still hold (see the module docstring)."""
    rec = entry.get("versions")
    if not isinstance(rec, dict):
        return False
    want = entry_versions(backend, versions)
    for k, v in want.items():
        got = rec.get(k)
        if k == "mhc_kernels":
            if got != v:
                return False
        elif _major_minor(got) != _major_minor(v):
            return False
    return True


# -- reading files -------------------------------------------------------------
_WARNED: set = set()


def _warn_once(path: str, why: str) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    warnings.warn(f"mhc_kernels: ignoring tuned-config file {path}: {why}; the kernels use their default "
                  f"configs for this device (re-run `mhc-kernels autotune` to rebuild it)", RuntimeWarning,
                  stacklevel=3)


def read_store(path: str, *, warn: bool = True) -> Optional[dict]:
    """The parsed store at ``path``; ``None`` if absent, or (with one warning) corrupt or of another schema."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if warn:
            _warn_once(path, f"cannot be read as JSON ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        if warn:
            _warn_once(path, "not a config store (no 'entries' object)")
        return None
    if data.get("schema") != SCHEMA_VERSION:
        if warn:
            _warn_once(path, f"schema version {data.get('schema')!r}, this mhc_kernels reads {SCHEMA_VERSION}")
        return None
    return data


def _valid_config(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("config"), dict)


def _build_index(device_name: str) -> dict:
    """``(op, backend, dtype_name, n, C) -> sorted [(bucket, config)]`` from bundled + user files."""
    versions = current_versions()
    merged: dict[str, dict] = {}
    for d in (bundled_config_dir(), user_config_dir()):  # later wins
        data = read_store(os.path.join(d, store_filename(device_name)))
        if data is None:
            continue
        for key, entry in data["entries"].items():
            parts = split_key(key) if isinstance(key, str) else None
            if parts is None or not _valid_config(entry) or not entry_is_current(entry, parts[1], versions):
                continue
            merged[key] = entry
    index: dict[tuple, list] = {}
    for key, entry in merged.items():
        op, backend, dt, n, C, T = split_key(key)
        index.setdefault((op, backend, dt, n, C), []).append((T, entry["config"]))
    for v in index.values():
        v.sort(key=lambda p: p[0])
    return index


def _nearest(buckets: list, T: int):
    lt = math.log2(max(T, 1))
    # smallest log distance; on a tie the larger bucket (its tiling covers T without idling)
    return min(buckets, key=lambda p: (abs(math.log2(p[0]) - lt), -p[0]))[1]


_DEVICE_NAMES: dict = {}   # device (as given) -> device name, resolved once
_INDEX: dict = {}          # device name -> index of that device's store
_MEMO: dict = {}           # (op, backend, device name, dtype, n, C, bucket) -> config or None
_MEMO_LIMIT = 1 << 16


_ON_CLEAR: list = []       # callbacks of caches built from lookups (the registry's resolved configs)


def on_clear(callback: Callable[[], None]) -> None:
    """Have :func:`clear_cache` also call ``callback`` (a cache derived from lookups)."""
    _ON_CLEAR.append(callback)


def clear_cache() -> None:
    """Forget every file read and every lookup (tests; the tuner after writing)."""
    _DEVICE_NAMES.clear()
    _INDEX.clear()
    _MEMO.clear()
    _WARNED.clear()
    for cb in _ON_CLEAR:
        cb()


def _device_name(device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        import torch

        d = torch.device(device)
        if d.type == "cuda":
            if d.index is None:  # "the current device" can change: resolve without caching
                return torch.cuda.get_device_name(torch.cuda.current_device())
            name = torch.cuda.get_device_name(d.index)
        else:
            name = d.type
        _DEVICE_NAMES[device] = name
    return name


def lookup(op: str, backend: str, device, dtype, n: int, C: int, T: int):
    """The tuned config dict for one call, or ``None`` to use the kernel's default heuristic.

    The core calls this once per resolved config (``registry.config_for``; never from a fake
    implementation). The returned dict is shared: treat it as read-only.
    """
    if type(T) is not int or type(n) is not int or type(C) is not int:  # symbolic sizes: no lookup
        return None
    b = token_bucket(T)
    try:
        name = _device_name(device)
    except Exception:  # noqa: BLE001  (a device we cannot name has no configs; never fail a kernel call)
        return None
    key = (op, backend, name, dtype, n, C, b)
    try:
        return _MEMO[key]
    except KeyError:
        pass
    index = _INDEX.get(name)
    if index is None:
        index = _INDEX[name] = _build_index(name)
    buckets = index.get((op, backend, dtype_name(dtype), n, C))
    hit = None
    if buckets:
        exact = [cfg for bt, cfg in buckets if bt == b]
        hit = exact[0] if exact else _nearest(buckets, b)
    if len(_MEMO) < _MEMO_LIMIT:
        _MEMO[key] = hit
    return hit
