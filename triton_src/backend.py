"""Registers the Triton kernels as the ``triton`` backend.

Every op of :data:`mhc_kernels.specs.SPECS` maps to a launch wrapper with the
reference's signature (see :mod:`.common`). The registry serves CUDA tensors with
them, and CPU tensors when ``TRITON_INTERPRET=1`` (the probe in ``__init__``).
"""

from __future__ import annotations

import functools

from mhc_kernels import recompute
from mhc_kernels.registry import register_kernel

from . import common, fused, mix, norm_fn, sinkhorn

# op -> (module, wrapper name, tuned: the module declares the op's config space and default)
_KERNELS = {
    "norm_fn": (norm_fn, "norm_fn_fwd", True),
    "norm_fn_bwd": (norm_fn, "norm_fn_bwd", True),
    "split_mixes": (sinkhorn, "split_mixes_fwd", True),
    "split_mixes_bwd": (sinkhorn, "split_mixes_bwd", True),
    "sinkhorn": (sinkhorn, "sinkhorn_fwd", True),
    "sinkhorn_bwd": (sinkhorn, "sinkhorn_bwd", True),
    "pre_apply_mix": (mix, "pre_apply_mix_fwd", True),
    "pre_apply_mix_bwd": (mix, "pre_apply_mix_bwd", True),
    "post": (mix, "post_fwd", True),
    "post_bwd": (mix, "post_bwd", True),
    "expand": (mix, "expand_fwd", True),
    "expand_bwd": (mix, "expand_bwd", True),
    # compositions (their parts are tuned individually)
    "mhc_pre": (fused, "mhc_pre_fwd", False),
    "mhc_pre_bwd": (fused, "mhc_pre_bwd", False),
    "mhc_head": (fused, "mhc_head_fwd", False),
    "mhc_head_bwd": (fused, "mhc_head_bwd", False),
    "post_pre": (fused, "post_pre_fwd", False),
}

KERNEL_MODULES = (norm_fn, sinkhorn, mix, fused)


# ops whose kernels (or parts) run the Sinkhorn iterations, and so share its limits on n
_RUN_SINKHORN = {"split_mixes", "split_mixes_bwd", "sinkhorn", "sinkhorn_bwd", "mhc_pre", "mhc_pre_bwd", "post_pre"}


def _supports(op):
    def supports(call):
        reason = common.supports_call(call)
        if reason is None and op in _RUN_SINKHORN:
            reason = sinkhorn.supports(call)
        return reason

    return supports


for _op, (_mod, _fn_name, _tuned) in _KERNELS.items():
    register_kernel(
        _op, "triton", getattr(_mod, _fn_name),
        supports=_supports(_op),
        config_space=functools.partial(_mod.config_space, _op) if _tuned else None,
        default_config=functools.partial(_mod.default_config, _op) if _tuned else None,
    )

# DESIGN 2.7's forward-only multilayer_recompute (op registered by mhc_kernels.recompute), composed
# from the post and pre_apply_mix kernels writing straight into the per-layer output slices.
register_kernel("multilayer_recompute", "triton", recompute.composed_kernel(mix.post_fwd, mix.pre_apply_mix_fwd),
                supports=_supports("multilayer_recompute"))
