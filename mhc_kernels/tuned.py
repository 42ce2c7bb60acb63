"""Where tuned kernel configs live (the per-GPU config store is read from here).

* bundled configs ship inside the package (``mhc_kernels/autotune/configs/``);
* user configs live in ``$MHC_KERNELS_CONFIG_DIR``, default
  ``$XDG_CACHE_HOME/mhc_kernels/configs`` (``~/.cache/...``), and take precedence.
"""

from __future__ import annotations

import importlib.util
import os

CONFIG_DIR_ENV = "MHC_KERNELS_CONFIG_DIR"


def user_config_dir() -> str:
    d = os.environ.get(CONFIG_DIR_ENV)
    if d:
        return os.path.abspath(os.path.expanduser(d))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mhc_kernels", "configs")


def bundled_config_dir() -> str:
    spec = importlib.util.find_spec("mhc_kernels.autotune")
    return os.path.join(list(spec.submodule_search_locations)[0], "configs")


def lookup(op: str, backend: str, device, dtype, n: int, C: int, T: int):
    """The tuned config dict for one call, or ``None`` to use the kernel's default heuristic.

    Kernels call this from their launch wrapper (never from a fake implementation).
    The per-device store and the nearest-token-bucket search arrive with the tuner;
    until then there are no tuned configs and every kernel uses its default.
    """
    return None
