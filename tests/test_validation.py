"""Bad inputs raise the documented error type with a message naming argument, expectation and value."""

import math

import pytest
import torch

import mhc_kernels as mk
from mhc_kernels import MHCDtypeError, MHCInputError
from mhc_kernels.reference import cases

T, N, C = 3, 4, 16


@pytest.fixture(params=[True, False], ids=["fastpath", "ops"])
def both_paths(request):
    """Every check must hold for the eager fast path and for torch.ops.mhc alike."""
    mk.set_eager_fastpath(request.param)
    yield
    mk.set_eager_fastpath(True)


def _pre(**over):
    d = cases.make_inputs("mhc_pre", (T,), N, C, torch.float32, norm_weight=True)
    d.update(over)
    return d


def _call_pre(d, **kw):
    return mk.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"], norm_weight=d["norm_weight"], **kw)


def _raises(exc, *fragments):
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in error message: {msg}"
            return handled

    return _Ctx()


# -- dtypes ------------------------------------------------------------------------------------
def test_residual_integer_dtype(both_paths):
    with _raises(MHCDtypeError, "mhc.mhc_pre", "'residual'", "bfloat16, float16 or float32", "torch.int64"):
        _call_pre(_pre(residual=torch.zeros(T, N, C, dtype=torch.int64)))


def test_fn_must_be_float32(both_paths):
    with _raises(MHCDtypeError, "'fn'", "torch.float32", "got torch.bfloat16"):
        d = _pre()
        _call_pre(dict(d, fn=d["fn"].bfloat16()))


def test_scale_float64_with_float32_residual(both_paths):
    with _raises(MHCDtypeError, "'scale'", "torch.float32", "got torch.float64"):
        d = _pre()
        _call_pre(dict(d, scale=d["scale"].double()))


def test_layer_output_dtype_must_match_residual(both_paths):
    x = torch.randn(T, N, C, dtype=torch.bfloat16)
    with _raises(MHCDtypeError, "'layer_output'", "torch.bfloat16", "dtype of 'residual'", "got torch.float32"):
        mk.mhc_post(torch.randn(T, C), x, torch.rand(T, N), torch.rand(T, N, N))


def test_dtype_errors_are_also_type_errors():
    with pytest.raises(TypeError):
        _call_pre(_pre(residual=torch.zeros(T, N, C, dtype=torch.int32)))


# -- shapes --------------------------------------------------------------------------------------
def test_fn_wrong_shape(both_paths):
    d = _pre()
    with _raises(MHCInputError, "'fn'", "(m, K) = (24, 64)", "n=4, C=16", "got (24, 63)"):
        _call_pre(dict(d, fn=d["fn"][:, :63]))
    with _raises(MHCInputError, "'fn'", "(24, 64)", "got (23, 64)"):
        _call_pre(dict(d, fn=d["fn"][:23]))


def test_base_and_norm_weight_wrong_shape(both_paths):
    d = _pre()
    with _raises(MHCInputError, "'base'", "(m,) = (24,)", "got (25,)"):
        _call_pre(dict(d, base=torch.zeros(25)))
    with _raises(MHCInputError, "'norm_weight'", "(K,) = (64,)", "got (16,)"):
        _call_pre(dict(d, norm_weight=torch.ones(16)))


def test_mismatched_leading_dims(both_paths):
    x = torch.randn(2, T, N, C)
    with _raises(MHCInputError, "'layer_output'", "(..., C) = (2, 3, 16)", "got (3, 16)"):
        mk.mhc_post(torch.randn(T, C), x, torch.rand(2, T, N), torch.rand(2, T, N, N))
    with _raises(MHCInputError, "'comb_mix'", "(..., n, n) = (2, 3, 4, 4)", "got (2, 3, 4, 3)"):
        mk.mhc_post(torch.randn(2, T, C), x, torch.rand(2, T, N), torch.rand(2, T, N, 3))


def test_residual_needs_two_dims(both_paths):
    with _raises(MHCInputError, "'residual'", "(..., n, C)", "at least 2 dims", "got (16,)"):
        mk.pre_apply_mix(torch.randn(C), torch.rand(1))


def test_mixes_width_must_be_n_times_n_plus_2(both_paths):
    with _raises(MHCInputError, "'mixes'", "n*(n+2)", "got 10"):
        mk.split_mixes(torch.randn(T, 10), torch.ones(3), torch.zeros(10))


def test_sinkhorn_logits_must_be_square(both_paths):
    with _raises(MHCInputError, "'logits'", "(..., n, n)", "got (3, 4, 5)"):
        mk.sinkhorn(torch.randn(T, 4, 5))


def test_zero_streams(both_paths):
    with _raises(MHCInputError, "n = 0 streams", "n must be >= 1"):
        mk.pre_apply_mix(torch.randn(T, 0, C), torch.rand(T, 0))
    with _raises(MHCInputError, "'n'", "must be >= 1", "got 0"):
        mk.expand(torch.randn(T, C), 0)


def test_zero_width(both_paths):
    with _raises(MHCInputError, "C = 0", "C must be >= 1"):
        mk.pre_apply_mix(torch.randn(T, N, 0), torch.rand(T, N))


def test_missing_tensor(both_paths):
    with _raises(MHCInputError, "'post_mix' is required"):
        mk.mhc_post(torch.randn(T, C), torch.randn(T, N, C), None, torch.rand(T, N, N))


# -- devices ---------------------------------------------------------------------------------------
def test_mixed_devices(both_paths):
    d = _pre()
    with _raises(MHCInputError, "'fn' is on meta", "'residual' is on cpu", "one device"):
        _call_pre(dict(d, fn=d["fn"].to("meta")))


# -- scalars -----------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [0, -3])
def test_sinkhorn_iters_below_one(both_paths, iters):
    with _raises(MHCInputError, "'sinkhorn_iters'", ">= 1", f"got {iters}"):
        _call_pre(_pre(), sinkhorn_iters=iters)
    with _raises(MHCInputError, "'iters'", ">= 1"):
        mk.sinkhorn(torch.randn(2, 3, 3), iters=iters)


def test_sinkhorn_iters_must_be_int():
    with _raises(MHCDtypeError, "'sinkhorn_iters'", "must be an int", "float"):
        _call_pre(_pre(), sinkhorn_iters=2.0)


@pytest.mark.parametrize("name", ["norm_eps", "pre_eps", "sinkhorn_eps", "post_mult"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_constants(both_paths, name, value):
    with _raises(MHCInputError, f"'{name}'", "must be finite"):
        _call_pre(_pre(), **{name: value})


def test_negative_pre_eps_is_refused_and_zero_accepted(both_paths):
    with _raises(MHCInputError, "'pre_eps'", ">= 0", "got -0.001"):
        _call_pre(_pre(), pre_eps=-1e-3)
    _call_pre(_pre(), pre_eps=0.0)  # an offset of zero is harmless


@pytest.mark.parametrize("value", [-1e-3, 0.0])
@pytest.mark.parametrize("name", ["norm_eps", "sinkhorn_eps", "post_mult"])
def test_guards_must_be_positive(both_paths, name, value):
    """norm_eps and sinkhorn_eps guard rsqrt(0) and 0/0 (an all-zero row, a Sinkhorn column whose exp
    underflows): zero is refused, not turned into NaN; post_mult <= 0 would flip or kill the post mix."""
    with _raises(MHCInputError, f"'{name}'", "> 0", f"got {value!r}"):
        _call_pre(_pre(), **{name: value})


def test_sinkhorn_eps_zero_is_refused_by_the_sinkhorn_op(both_paths):
    with _raises(MHCInputError, "'eps'", "> 0"):
        mk.sinkhorn(torch.randn(2, 4, 4), eps=0.0)


def test_non_tensor_argument():
    with _raises(MHCInputError, "'residual'", "torch.Tensor", "got list"):
        mk.pre_apply_mix([[1.0]], torch.rand(1, 1))
    # through torch.ops the dispatcher rejects it first, naming the argument and the type
    mk.set_eager_fastpath(False)
    try:
        with _raises(RuntimeError, "'residual'", "Tensor", "list"):
            mk.pre_apply_mix([[1.0]], torch.rand(1, 1))
    finally:
        mk.set_eager_fastpath(True)


def test_errors_under_torch_compile_are_the_same():
    f = torch.compile(lambda x, p: mk.pre_apply_mix(x, p), fullgraph=True)
    with pytest.raises(Exception, match="'pre_mix' must have shape"):
        f(torch.randn(T, N, C), torch.rand(T, N + 1))


def test_a_call_records_the_tensors_off_a_full_alignment():
    """Call.alignment: for each tensor argument whose data pointer is less than 16-byte aligned (a view at a storage
    offset), its name, the pointer's alignment and its rows' (powers of two, in bytes, at most 16), for the
    backends whose vector accesses need aligned tensors (TileLang: test_tilelang_emulated). Fresh allocations do
    not appear, nor do views at aligned offsets or empty tensors."""
    from mhc_kernels.specs import SPECS
    from mhc_kernels.validation import bind, complete

    d = cases.make_inputs("post", (5,), 4, 256, torch.bfloat16, "cpu", seed=1)
    spec = SPECS["post"]

    def alignment(**over):
        args = dict(d, **over)
        return bind(spec, complete(spec, (args["layer_output"], args["residual"], args["post_mix"],
                                          args["comb_mix"]), {})).alignment

    assert alignment() == ()
    for offset, want in ((3, (("residual", 2, 16),)), (4, (("residual", 8, 16),)), (8, ())):
        buf = torch.zeros(d["residual"].numel() + offset, dtype=torch.bfloat16)
        assert alignment(residual=buf[offset:].view(d["residual"].shape)) == want, offset
    mixes = torch.zeros(5 * 4 + 1)[1:].view(5, 4)   # float32, 4 bytes in; rows of 16 bytes
    assert alignment(post_mix=mixes) == (("post_mix", 4, 16),)
    odd_rows = torch.zeros(5 * 4 * 33 + 4, dtype=torch.bfloat16)[4:].view(5, 4, 33)   # rows of 264 bytes
    assert bind(spec, complete(spec, (d["layer_output"][:, :33].contiguous(), odd_rows, d["post_mix"],
                                      d["comb_mix"]), {})).alignment == (("residual", 8, 8),)
    empty = torch.zeros(1, dtype=torch.bfloat16)[1:]   # no elements: its address does not count
    assert bind(SPECS["expand"], complete(SPECS["expand"], (empty.view(0, 1), 4), {})).alignment == ()
