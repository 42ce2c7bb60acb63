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
