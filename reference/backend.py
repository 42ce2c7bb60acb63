"""Registers the PyTorch reference (``torch_ref``) as the ``reference`` backend for every op.

The reference serves any device PyTorch runs on and every dtype the contract allows,
float64 included (the mode ``torch.autograd.gradcheck`` needs); it has no tunable
parameters.
"""

from mhc_kernels.registry import register_kernel

from . import torch_ref

_KERNELS = {
    "norm_fn": torch_ref.norm_fn_fwd,
    "norm_fn_bwd": torch_ref.norm_fn_bwd,
    "split_mixes": torch_ref.split_mixes_fwd,
    "split_mixes_bwd": torch_ref.split_mixes_bwd,
    "sinkhorn": torch_ref.sinkhorn_fwd,
    "sinkhorn_bwd": torch_ref.sinkhorn_bwd,
    "pre_apply_mix": torch_ref.pre_apply_mix_fwd,
    "pre_apply_mix_bwd": torch_ref.pre_apply_mix_bwd,
    "post": torch_ref.post_fwd,
    "post_bwd": torch_ref.post_bwd,
    "mhc_pre": torch_ref.mhc_pre_fwd,
    "mhc_pre_bwd": torch_ref.mhc_pre_bwd,
    "expand": torch_ref.expand_fwd,
    "expand_bwd": torch_ref.expand_bwd,
    "mhc_head": torch_ref.mhc_head_fwd,
    "mhc_head_bwd": torch_ref.mhc_head_bwd,
    "post_pre": torch_ref.post_pre_fwd,
}

for _op, _fn in _KERNELS.items():
    register_kernel(_op, "reference", _fn)

# DESIGN 2.7's multilayer_recompute is a forward-only op registered by mhc_kernels.recompute
# (its layer dim has no op-spec symbol); the reference serves it too.
register_kernel("multilayer_recompute", "reference", torch_ref.multilayer_recompute_fwd)
