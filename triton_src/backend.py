"""Registers the Triton kernels as the ``triton`` backend.

Every op of :data:`mhc_kernels.specs.SPECS` maps to a launch wrapper with the
reference's signature (see :mod:`.common`). The registry serves CUDA tensors with
them, and CPU tensors when ``TRITON_INTERPRET=1`` (the probe in ``__init__``).
"""

from __future__ import annotations

from mhc_kernels import recompute
from mhc_kernels.registry import register_kernel

from . import common, fused, mix, norm_fn, sinkhorn

# op -> (module, wrapper name, name of the config-space owner or None)
_KERNELS = {
    "norm_fn": (norm_fn, "norm_fn_fwd", "norm_fn"),
    "norm_fn_bwd": (norm_fn, "norm_fn_bwd", "norm_fn_bwd"),
    "split_mixes": (sinkhorn, "split_mixes_fwd", "split_mixes"),
    "split_mixes_bwd": (sinkhorn, "split_mixes_bwd", "split_mixes_bwd"),
    "sinkhorn": (sinkhorn, "sinkhorn_fwd", "sinkhorn"),
    "sinkhorn_bwd": (sinkhorn, "sinkhorn_bwd", "sinkhorn_bwd"),
    "pre_apply_mix": (mix, "pre_apply_mix_fwd", "pre_apply_mix"),
    "pre_apply_mix_bwd": (mix, "pre_apply_mix_bwd", "pre_apply_mix_bwd"),
    "post": (mix, "post_fwd", "post"),
    "post_bwd": (mix, "post_bwd", "post_bwd"),
    "expand": (mix, "expand_fwd", "expand"),
    "expand_bwd": (mix, "expand_bwd", "expand_bwd"),
    # compositions (their parts are tuned individually)
    "mhc_pre": (fused, "mhc_pre_fwd", None),
    "mhc_pre_bwd": (fused, "mhc_pre_bwd", None),
    "mhc_head": (fused, "mhc_head_fwd", None),
    "mhc_head_bwd": (fused, "mhc_head_bwd", None),
    "post_pre": (fused, "post_pre_fwd", None),
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


for _op, (_mod, _fn_name, _owner) in _KERNELS.items():
    register_kernel(
        _op, "triton", getattr(_mod, _fn_name),
        supports=_supports(_op),
        config_space=getattr(_mod, f"{_owner}_config_space", None) if _owner else None,
        default_config=getattr(_mod, f"{_owner}_default_config", None) if _owner else None,
    )

# DESIGN 2.7's forward-only multilayer_recompute (op registered by mhc_kernels.recompute), composed
# from the post and pre_apply_mix kernels writing straight into the per-layer output slices.
register_kernel("multilayer_recompute", "triton", recompute.composed_kernel(mix.post_fwd, mix.pre_apply_mix_fwd),
                supports=_supports("multilayer_recompute"))
