"""Writing the per-GPU config store (the format itself is defined in :mod:`mhc_kernels.tuned`).

The core only reads config files; this module is the one writer. A store is one
JSON file per device model in a directory (``--out``, default the user config
dir). Every save is atomic: the new content goes to a temporary file in the same
directory, is flushed to disk, and replaces the old file with ``os.replace``, so a
reader (or a crash) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Optional

from mhc_kernels import tuned


def store_path(out_dir: str, device_name: str) -> str:
    return os.path.join(out_dir, tuned.store_filename(device_name))


class ConfigStore:
    """The entries of one device's store file, loaded, updated and saved atomically."""

    def __init__(self, path: str, device: dict, versions: Optional[dict] = None):
        self.path = path
        self.device = dict(device)
        self.versions = dict(versions if versions is not None else tuned.current_versions())
        self.entries: dict[str, dict] = {}
        data = tuned.read_store(path)  # corrupt / other schema: warned about, started afresh
        if data is not None:
            self.entries = {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    @classmethod
    def for_device(cls, out_dir: str, device: dict, versions: Optional[dict] = None) -> "ConfigStore":
        return cls(store_path(out_dir, device["name"]), device, versions)

    # -- entries ---------------------------------------------------------------
    def get(self, op, backend, dtype, n, C, T) -> Optional[dict]:
        return self.entries.get(tuned.entry_key(op, backend, dtype, n, C, T))

    def is_done(self, op, backend, dtype, n, C, T) -> bool:
        """Whether a current (not version-stale) entry exists: what ``--resume`` skips."""
        e = self.get(op, backend, dtype, n, C, T)
        return e is not None and "config" in e and tuned.entry_is_current(e, backend, self.versions)

    def put(self, op, backend, dtype, n, C, T, *, config: dict, us: float, gbps: float,
            default_config: Optional[dict] = None, default_us: Optional[float] = None, timing: str = "",
            candidates: Optional[int] = None) -> dict:
        entry = {
            "config": dict(config),
            "us": round(float(us), 3),
            "gbps": round(float(gbps), 2),
            "default_config": None if default_config is None else dict(default_config),
            "default_us": None if default_us is None else round(float(default_us), 3),
            "timing": timing,
            "candidates": candidates,
            "versions": tuned.entry_versions(backend, self.versions),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.entries[tuned.entry_key(op, backend, dtype, n, C, T)] = entry
        return entry

    # -- file ------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": tuned.SCHEMA_VERSION,
            "device": self.device,
            "versions": self.versions,
            "entries": dict(sorted(self.entries.items(), key=lambda kv: _sort_key(kv[0]))),
        }

    def save(self) -> None:
        atomic_write_json(self.path, self.to_json())


def _sort_key(key: str):
    parts = tuned.split_key(key)
    return (0, parts) if parts is not None else (1, (key,))


def atomic_write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never a partial file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
