"""Batch-invariant mode: a token's forward outputs do not depend on the batch it is computed in.

By default the kernels pick their reduction splits from the token count (a projection over ``K = n*C``
is split into more K ranges when few tokens cannot fill the GPU, and a tuned config may differ per
token-count bucket), so a token computed alone (decode, T = 1) and the same token inside a batch of 300
(prefill) go through different summation orders and can differ in the last bits. RL rollouts scored by
a trainer, and train/inference parity checks, need them equal.

In batch-invariant mode (:func:`batch_invariant`, or ``MHC_KERNELS_BATCH_INVARIANT=1`` for the process)
every *forward* op runs with the config its kernel would choose at a fixed token count,
:data:`BATCH_INVARIANT_TOKENS`, whatever the call's own T (the tuned store is asked at that count too):
one split over K, one tile shape, so every token's arithmetic is the same at any T and any position in
the batch. The Triton and TileLang kernels are otherwise row-independent (each token's dot products,
sums of squares, Sinkhorn and collapse use only its own values and the config's fixed order). The
reference backend runs on PyTorch, whose CPU matmul and reductions pick their algorithm from the shape
(a one-row matmul is a matrix-vector product with another summation order; a single-output reduction
is split across threads); there a forward op runs on fixed chunks of :data:`REFERENCE_CHUNK` tokens
(the last one zero-padded), so every PyTorch call sees the same shapes.

Backward ops are not affected (their parameter gradients are sums over the batch by definition). The
cost: at T >= 4096 none on the GPU backends (the fixed config is the default there), at small T fewer
K splits than the default (less parallel decode); ``mhc-kernels bench`` reports it (``--batch-invariant``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Optional

import torch

ENV_VAR = "MHC_KERNELS_BATCH_INVARIANT"
BATCH_INVARIANT_TOKENS = 4096   # the token count whose config every forward call uses in the mode
REFERENCE_CHUNK = 32            # tokens per PyTorch call of the reference backend in the mode

_MODE: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("mhc_kernels_batch_invariant", default=None)


@functools.lru_cache(maxsize=1)
def _env_enabled() -> bool:
    """``MHC_KERNELS_BATCH_INVARIANT``, read once per process (every op call asks: not an environment
    lookup on the hot path)."""
    v = os.environ.get(ENV_VAR, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    from .errors import MHCInputError

    raise MHCInputError(f"{ENV_VAR}={v!r}: expected 1/true/yes/on or 0/false/no/off (or unset)")


def batch_invariant_enabled() -> bool:
    """Whether batch-invariant mode is on here: the innermost :func:`batch_invariant` block, else
    ``MHC_KERNELS_BATCH_INVARIANT``.

    Example::

        >>> with mk.batch_invariant():
        ...     mk.batch_invariant_enabled()
        True
    """
    v = _MODE.get()
    return _env_enabled() if v is None else v


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Run the mHC forward ops inside the block in batch-invariant mode (``enabled=False``: the default
    mode, overriding ``MHC_KERNELS_BATCH_INVARIANT``): every token's outputs are bitwise the same whether
    it is computed alone or at any position of any batch, on every backend (see the module docstring).

    Example::

        >>> x = torch.randn(7, 4, 64)
        >>> fn, scale, base = torch.randn(24, 256) / 16, torch.full((3,), 0.01), torch.zeros(24)
        >>> with mk.batch_invariant():
        ...     batch = mk.mhc_pre(x, fn, scale, base)[0]
        ...     alone = mk.mhc_pre(x[3:4], fn, scale, base)[0]
        >>> torch.equal(batch[3:4], alone)
        True
    """
    token = _MODE.set(bool(enabled))
    try:
        yield
    finally:
        _MODE.reset(token)


def config_call(call):
    """The call whose config a forward op runs with in batch-invariant mode: ``call`` at
    :data:`BATCH_INVARIANT_TOKENS` tokens (no arguments: config functions read sizes only)."""
    from .validation import Call

    return Call(call.spec, None, BATCH_INVARIANT_TOKENS, call.n, call.C, (BATCH_INVARIANT_TOKENS,), call.act_dtype,
                call.mix_dtype, call.device, call.sizes, call.iters, call.alignment)


def _token_dim(shape) -> Optional[int]:
    return 0 if shape and shape[0] == "*" else None


def run_in_chunks(kernel, call):
    """Run a reference forward kernel on ``call`` in chunks of :data:`REFERENCE_CHUNK` tokens (the last one
    zero-padded: zeros are a valid input of every op) -> the kernel's outputs for all tokens."""
    spec = call.spec
    T = int(call.T)
    token_args = [_token_dim(a.shape) == 0 if hasattr(a, "shape") else False for a in spec.args]
    per_layer = any(getattr(a, "shape", ())[:1] == ("L",) for a in spec.args)
    if T == 0 or not any(token_args) or per_layer:   # multilayer_recompute: elementwise in every token
        return kernel(*call.args)
    B = REFERENCE_CHUNK
    pieces = []
    for s in range(0, T, B):
        rows = min(B, T - s)
        args = []
        for arg, is_token in zip(call.args, token_args):
            if is_token and isinstance(arg, torch.Tensor):
                chunk = arg[s:s + rows]
                if rows < B:
                    chunk = torch.cat([chunk, chunk.new_zeros((B - rows,) + tuple(chunk.shape[1:]))])
                args.append(chunk)
            else:
                args.append(arg)
        outs = kernel(*args)
        single = isinstance(outs, torch.Tensor)
        outs = (outs,) if single else tuple(outs)
        pieces.append(tuple(o[:rows] for o in outs))
    cat = tuple(torch.cat([p[i] for p in pieces]) for i in range(len(pieces[0])))
    return cat[0] if len(cat) == 1 else cat
