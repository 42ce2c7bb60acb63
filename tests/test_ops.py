"""``torch.ops.mhc``: opcheck, the eager fast path, torch.compile, saved tensors, layouts."""

import pytest
import torch
from op_samples import op_args

import mhc_kernels as mk
from mhc_kernels.ops import FUNCTIONS
from mhc_kernels.reference import cases
from mhc_kernels.specs import SPECS


def _with_grad(args, on):
    return tuple(a.detach().clone().requires_grad_() if on and isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["T3", "B2xT3"])
def test_opcheck(name, lead):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic) for every op."""
    op = getattr(torch.ops.mhc, name)
    args = _with_grad(op_args(name, lead=lead), name in FUNCTIONS)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_opcheck_without_norm_weight_and_float64(name):
    op = getattr(torch.ops.mhc, name)
    torch.library.opcheck(op, _with_grad(op_args(name, norm_weight=False, dtype=torch.float64), True))


@pytest.mark.parametrize("op", list(cases.CASES))
def test_fast_path_equals_op_path(op):
    """The eager fast path and torch.ops.mhc give bit-identical outputs and gradients."""
    inputs = cases.make_inputs(op, (4,), 2, 9, torch.bfloat16, norm_weight=True, consts=cases.LOUD_CONSTS)
    case = cases.CASES[op]
    diff = [k for k in case.differentiable if inputs.get(k) is not None]
    results = []
    for fast in (True, False):
        mk.set_eager_fastpath(fast)
        try:
            leaves = {k: (v.detach().clone().requires_grad_() if k in diff else v) for k, v in inputs.items()}
            outs = case.run(mk, leaves)
            if diff:  # multilayer_recompute is forward only
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            results.append([o.detach() for o in outs] + [leaves[k].grad for k in diff])
        finally:
            mk.set_eager_fastpath(True)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fast_path_is_used_and_cheaper():
    """Eager calls skip the dispatcher unless the fast path is switched off (the op is still the op)."""
    assert mk.eager_fastpath_enabled()
    x = torch.randn(1, 4, 64)
    y = torch.randn(1, 64)
    p = torch.rand(1, 4)
    c = torch.rand(1, 4, 4)
    out = mk.mhc_post(y, x, p, c)
    assert torch.equal(out, torch.ops.mhc.post(y, x, p, c))


def _site(x, fn, scale, base, nw, w1, w2):
    li, post_mix, comb_mix = mk.mhc_pre(x, fn, scale, base, norm_weight=nw)
    h = torch.nn.functional.gelu(li @ w1) @ w2
    return mk.mhc_post(h, x, post_mix, comb_mix)


def test_torch_compile_fullgraph_site_forward_backward():
    """mhc_pre -> MLP -> mhc_post compiles with no graph break and matches eager, fwd and bwd."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    T, n, C = 6, 4, 32
    d = cases.make_inputs("mhc_pre", (T,), n, C, torch.float32, norm_weight=True)
    w1 = torch.randn(C, 2 * C) / C ** 0.5
    w2 = torch.randn(2 * C, C) / (2 * C) ** 0.5
    params = [d["residual"], d["fn"], d["scale"], d["base"], d["norm_weight"], w1, w2]

    def run(f):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        out = f(*leaves)
        out.backward(torch.ones_like(out) * 0.1 + torch.arange(C) / C)
        return [out.detach()] + [p.grad for p in leaves]

    eager = run(_site)
    compiled = run(torch.compile(_site, fullgraph=True))
    assert not torch._dynamo.utils.counters["graph_break"]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "ops"])
@pytest.mark.parametrize("out_norm", [False, True], ids=["plain", "out_norm"])
def test_mhc_pre_saves_only_residual_and_per_token_mixes(fast, out_norm):
    """In training, mhc_pre keeps the caller's residual (by reference) and O(n^2) floats per token: mixes and
    rstd, and with the sublayer's norm its rho (out_rstd) too."""
    T, n, C = 16, 4, 64
    d = cases.make_inputs("mhc_pre", (T,), n, C, torch.bfloat16, norm_weight=True)
    names = ("residual", "fn", "scale", "base", "norm_weight") + (("out_norm_weight",) if out_norm else ())
    params = {k: d[k].detach().clone().requires_grad_() for k in names}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    mk.set_eager_fastpath(fast)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            li, post_mix, comb_mix = mk.mhc_pre(params["residual"], params["fn"], params["scale"], params["base"],
                                                norm_weight=params["norm_weight"],
                                                out_norm_weight=params.get("out_norm_weight"))
    finally:
        mk.set_eager_fastpath(True)
    by_reference = {p.data_ptr() for p in params.values()}
    per_token = 0
    for t in saved:
        if t.data_ptr() in by_reference:
            continue
        assert t.shape[0] == T and t.numel() <= T * n * (n + 2), f"unexpected saved tensor {tuple(t.shape)}"
        per_token += t.numel()
    assert per_token <= T * (n * (n + 2) + 1 + int(out_norm)), per_token  # mixes + rstd (+ out_rstd)
    assert all(t.data_ptr() != li.data_ptr() for t in saved)  # the layer input is not kept
    (li.float().sum() + post_mix.sum() + comb_mix.sum()).backward()
    assert params["residual"].grad is not None
    if out_norm:
        assert params["out_norm_weight"].grad is not None and params["out_norm_weight"].grad.abs().sum() > 0


def test_non_contiguous_inputs_give_the_same_answer():
    T, n, C = 5, 4, 24
    d = cases.make_inputs("post_pre", (T,), n, C, torch.float32, norm_weight=True)
    ref = mk.post_pre(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["fn"], d["scale"],
                      d["base"], norm_weight=d["norm_weight"])

    def strided(t):  # same values, transposed storage
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1)

    nc = {k: strided(v) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v for k, v in d.items()}
    assert not nc["residual"].is_contiguous() and not nc["fn"].is_contiguous()
    got = mk.post_pre(nc["layer_output"], nc["residual"], nc["post_mix"], nc["comb_mix"], nc["fn"], nc["scale"],
                      nc["base"], norm_weight=nc["norm_weight"])
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # an expanded (stride-0) residual works too
    h = torch.randn(3, C)
    x = h.unsqueeze(1).expand(3, n, C)
    li = mk.pre_apply_mix(x, torch.full((3, n), 0.25))
    torch.testing.assert_close(li, h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", list(cases.CASES))
def test_zero_tokens_forward_and_backward(op):
    inputs = cases.make_inputs(op, (0, 3), 4, 16, torch.bfloat16, norm_weight=True)
    res = cases.check_forward(mk, op, inputs) + cases.check_backward(mk, op, inputs)
    assert all(r.ok for r in res), [r for r in res if not r.ok]


def test_outputs_are_fresh_tensors():
    """Functional ops never return (views of) their inputs, even where the math is an identity."""
    x = torch.randn(2, 1, 8)
    li = mk.pre_apply_mix(x, torch.ones(2, 1))
    assert li.data_ptr() != x.data_ptr()
    e = mk.expand(torch.randn(2, 8), 1)
    e2 = mk.expand(e[:, 0], 1)
    assert e2.data_ptr() != e.data_ptr()


@pytest.mark.parametrize("name", list(SPECS))
def test_each_op_runs_with_only_its_required_arguments(name):
    """``torch.ops.mhc.<op>`` takes the contract's defaults for every trailing argument (optional
    tensors: None; constants: §1's values), and gives what passing those defaults explicitly gives."""
    spec = SPECS[name]
    given = op_args(name, norm_weight=False)
    required = given[:len(spec.required)]  # the defaults are trailing, so the required arguments lead
    assert spec.arg_names[:len(required)] == spec.required
    explicit_defaults = required + tuple(spec.defaults[a] for a in spec.arg_names[len(required):])
    op = getattr(torch.ops.mhc, name)
    short, explicit = op(*required), op(*explicit_defaults)
    short = short if isinstance(short, tuple) else (short,)
    explicit = explicit if isinstance(explicit, tuple) else (explicit,)
    assert len(short) == len(spec.outputs)
    for a, b in zip(short, explicit):
        assert torch.equal(a, b)


def test_mhc_pre_schema_defaults_match_the_public_function():
    x = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    fn, scale, base = torch.randn(24, 32) / 6, torch.full((3,), 0.3), torch.randn(24) / 4
    li, post, comb, mixes, rstd, out_rstd, fp8_codes, fp8_scales = torch.ops.mhc.mhc_pre(x, fn, scale, base)
    assert fp8_codes.shape == fp8_scales.shape == (3, 0)    # no FP8 copy by default
    for a, b in zip((li, post, comb, mixes), mk.mhc_pre(x, fn, scale, base, return_mixes=True)):
        assert torch.equal(a, b)
    assert rstd.shape == (3,) and rstd.dtype == torch.float32
    assert torch.equal(out_rstd, torch.ones(3))          # no sublayer norm: rho is 1
    defaults = {a.name: a.default_value for a in torch.ops.mhc.mhc_pre.default._schema.arguments}
    assert defaults["norm_eps"] == 1e-6 and defaults["sinkhorn_iters"] == 20 and defaults["norm_weight"] is None
    assert defaults["out_norm_weight"] is None and defaults["out_norm_eps"] == 1e-6
