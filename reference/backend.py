"""Registers the PyTorch reference (``torch_ref``) as the ``reference`` backend for every op.

The reference serves any device PyTorch runs on and every dtype the contract allows,
float64 included (the mode ``torch.autograd.gradcheck`` needs); it has no tunable
parameters. Its composites are the shared ones (``mhc_kernels.composite``) over these
primitives: the reference fuses nothing.
"""

from mhc_kernels import composite
from mhc_kernels.registry import Kernel, register_kernel

from . import torch_ref

PRIMITIVES = {
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
    "expand": torch_ref.expand_fwd,
    "expand_bwd": torch_ref.expand_bwd,
}

for _op, _fn in PRIMITIVES.items():
    register_kernel(_op, "reference", _fn)

composite.register_composites(
    "reference",
    extra_parts={composite.STREAM_WEIGHT_GRAD: Kernel(composite.STREAM_WEIGHT_GRAD, "reference",
                                                      torch_ref.stream_weight_grad)})
