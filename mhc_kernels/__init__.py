"""mhc-kernels: fused kernels for Manifold-Constrained Hyper-Connections (mHC).

``import mhc_kernels`` registers the ``torch.ops.mhc.*`` custom ops and exposes the
functional API (:mod:`mhc_kernels.functional`) and the backend controls
(:func:`available_backends`, :func:`use_backend`, ``MHC_KERNELS_BACKEND``). No
backend toolchain (triton, tilelang) is imported until a call needs it.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# In a source checkout the sibling folders (reference/, triton_src/, ...) are not
# inside this package; the installed wheel maps them in as subpackages. Let the
# checkout import them the same way (mhc_kernels.reference, ...).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "reference", "torch_ref.py")) and _root not in __path__:
    __path__.append(_root)

from . import (  # noqa: E402,F401  (MHCSite & co, Amax gain, recompute)
    diagnostics,
    nn,
    ops,  # noqa: E402,F401  (registers torch.ops.mhc.*)
    recompute,
)
from .errors import BackendError, MHCDtypeError, MHCError, MHCInputError, MHCUnsupportedError  # noqa: E402
from .functional import (  # noqa: E402
    V41,
    expand,
    mhc_head,
    mhc_head_sp,
    mhc_post,
    mhc_pre,
    mhc_pre_sp,
    multilayer_recompute,
    norm_fn,
    post_pre,
    post_pre_sp,
    pre_apply_mix,
    quantize_fp8,
    sinkhorn,
    split_mixes,
)
from .invariance import batch_invariant, batch_invariant_enabled  # noqa: E402
from .ops import eager_fastpath_enabled, set_eager_fastpath  # noqa: E402
from .registry import BACKENDS, BackendStatus, available_backends, use_backend, which_backend  # noqa: E402
from .specs import SPECS  # noqa: E402

__all__ = [
    "__version__",
    "mhc_pre", "mhc_post", "norm_fn", "split_mixes", "sinkhorn", "pre_apply_mix", "expand", "mhc_head",
    "post_pre", "multilayer_recompute", "mhc_pre_sp", "post_pre_sp", "mhc_head_sp", "quantize_fp8", "V41",
    "available_backends", "use_backend", "which_backend", "BACKENDS", "BackendStatus",
    "set_eager_fastpath", "eager_fastpath_enabled", "batch_invariant", "batch_invariant_enabled",
    "MHCError", "MHCInputError", "MHCDtypeError", "MHCUnsupportedError", "BackendError",
    "SPECS",
]
