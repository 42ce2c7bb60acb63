"""DTensor (tensor / sequence parallel) and FSDP2 on CPU: two gloo processes, spawned once for the file.

One spawn runs every check (:data:`CHECKS`) on both ranks and writes what each rank saw to a file; the tests
read those reports. The spawn has a deadline, so a hang (a collective one rank never joins) fails the file
instead of blocking CI.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback

import pytest
import torch

import mhc_kernels as mk
from mhc_kernels import distributed as mk_distributed
from mhc_kernels.specs import SPECS, TensorArg

WORLD = 2
DEADLINE_S = 240

pytestmark = [
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.5",
                       reason="DTensor's register_sharding needs torch >= 2.5")]

B, S, N, C = 2, 6, 4, 16


# -- helpers run inside the workers ---------------------------------------------------------------------------
def _model(single_pass=False):
    """Expand -> two sites with small Linear sublayers -> head (float32: the comparison is exact up to the
    order of float32 sums)."""
    from torch import nn

    if single_pass:
        sites = [mk.nn.MHCSite(C, N, sublayer=nn.Linear(C, C), single_pass=True, sublayer_norm=True)
                 for _ in range(2)]
        head = mk.nn.MHCSinglePassHead(C, N)
    else:
        sites = [mk.nn.MHCSite(C, N, sublayer=nn.Sequential(nn.Linear(C, C), nn.GELU())) for _ in range(2)]
        head = mk.nn.MHCHead(C, N)
    model = nn.Sequential(mk.nn.MHCExpand(N, single_pass=single_pass), *sites, head)
    with torch.no_grad():   # move the gains off their init so the input-dependent mixes matter
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.3)
    return model


def _loss(out):
    return out.float().square().mean()


def _reference(model, x):
    """Single-process forward output and parameter gradients."""
    model = copy.deepcopy(model)
    out = model(x)
    _loss(out).backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs err {err:g}"


def _check_model(mesh, x, placements, compile_=False, single_pass=False):
    from torch.distributed.tensor import distribute_module, distribute_tensor

    model = _model(single_pass)
    ref_out, ref_grads = _reference(model, x)
    distribute_module(model, mesh)           # every parameter a replicated DTensor
    run = torch.compile(model, fullgraph=True) if compile_ else model
    xd = distribute_tensor(x, mesh, placements)
    out = run(xd)
    assert tuple(out.placements) == tuple(placements), f"output placements {out.placements}"
    _loss(out.full_tensor()).backward()
    _close(out, ref_out, "forward output")
    partial = 0
    for k, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {k}"
        partial += any(pl.is_partial() for pl in p.grad.placements)
        _close(p.grad, ref_grads[k], f"grad of {k}")
    return {"params": len(ref_grads), "partial_grads": partial}


def check_rules_lazy():
    # mhc_kernels was imported before torch.distributed.tensor here, so nothing is registered yet; the first
    # call (under torch.compile, the hardest path) registers the rules
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    assert not mk_distributed._registered
    mesh = init_device_mesh("cpu", (WORLD,))
    x = torch.randn(B, S, N, C)
    fn, scale, base = torch.randn(N * (N + 2), N * C) / 8, torch.full((3,), 0.3), torch.zeros(N * (N + 2))
    args = [distribute_tensor(t, mesh, [p]) for t, p in
            ((x, Shard(1)), (fn, Replicate()), (scale, Replicate()), (base, Replicate()))]
    out = torch.compile(lambda *a: mk.mhc_pre(*a), fullgraph=True)(*args)
    assert mk_distributed._registered
    for o, r in zip(out, mk.mhc_pre(x, fn, scale, base)):
        assert o.placements == (Shard(1),), o.placements
        _close(o, r, "mhc_pre under compile")
    return {}


def check_every_op():
    """Every torch.ops.mhc op, forward and backward, on its sample arguments: token tensors sharded on the
    sequence dim (or the flat token dim), parameters replicated -> the single-process outputs; token outputs
    keep the sharding, a backward op's parameter gradients are Partial(sum)."""
    from op_samples import op_args
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from mhc_kernels.distributed import _token_axis

    mesh = init_device_mesh("cpu", (WORLD,))
    done = []
    for lead, tdim, absent in (((2, 6), 1, False), ((6,), 0, False), ((2, 6), 1, True)):
        for name, spec in SPECS.items():
            args = op_args(name, lead=lead)
            if absent:   # the optional tensors left out (a rule must not count on their positions)
                if not any(isinstance(a, TensorArg) and a.optional for a in spec.args):
                    continue
                args = tuple(None if isinstance(a, TensorArg) and a.optional else v for a, v in zip(spec.args, args))
            ref = getattr(torch.ops.mhc, name)(*args)
            dargs = []
            for a, v in zip(spec.args, args):
                if isinstance(v, torch.Tensor):
                    at = _token_axis(a.shape)
                    v = distribute_tensor(v, mesh, [Replicate() if at is None else Shard(at + tdim)])
                dargs.append(v)
            out = getattr(torch.ops.mhc, name)(*dargs)
            outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
            for o, r, t in zip(outs, refs, spec.outputs):
                at = _token_axis(t.shape)
                want = (Shard(at + tdim),) if at is not None else None
                if want is not None:
                    assert o.placements == want, f"{name}.{t.name}: {o.placements} != {want}"
                else:
                    assert name.endswith("_bwd") and o.placements[0].is_partial(), f"{name}.{t.name}: {o.placements}"
                if o.dtype == torch.float8_e4m3fn:   # gloo cannot gather float8: this rank's shard, bitwise
                    mine = torch.chunk(r, WORLD, dim=at + tdim)[torch.distributed.get_rank()]
                    assert torch.equal(o.to_local().view(torch.uint8), mine.view(torch.uint8)), f"{name}.{t.name}"
                    continue
                _close(o, r, f"{name}.{t.name} (lead {lead})", atol=1e-5, rtol=1e-5)
            done.append(name + " (optional tensors absent)" if absent else name)
    return {"ops": sorted(set(done))}


def check_model_eager():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    x = torch.randn(B, S, C)
    return _check_model(mesh, x, [Shard(1)])


def check_model_tokens_and_single_pass():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    r = {}
    r["tokens"] = _check_model(mesh, torch.randn(B * S, C), [Shard(0)])
    r["replicated"] = _check_model(mesh, torch.randn(B, S, C), [Replicate()])
    r["single_pass"] = _check_model(mesh, torch.randn(B, S, C), [Shard(1)], single_pass=True)
    return r


def check_model_compile():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    return _check_model(mesh, torch.randn(B, S, C), [Shard(1)], compile_=True)


def check_kernel_backend():
    """A kernel backend (Triton; on CPU under its interpreter) serves DTensor calls on the local shards: before
    the rules, the eager fast path handed it the DTensor itself ("invalid python storage")."""
    if not mk.available_backends("cpu")["triton"].available:
        return {"skipped": mk.available_backends("cpu")["triton"].reason}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from mhc_kernels import registry

    mesh = init_device_mesh("cpu", (WORLD,))
    seen = set()
    select = registry.select

    def spy(call):
        k = select(call)
        seen.add((call.spec.name, k.backend))
        return k

    registry.select = spy
    try:
        with mk.use_backend("triton"):
            info = _check_model(mesh, torch.randn(B, S, C), [Shard(1)])
    finally:
        registry.select = select
    assert {b for _, b in seen} == {"triton"}, seen
    assert {"mhc_pre", "mhc_pre_bwd", "post", "post_bwd", "mhc_head_bwd"} <= {o for o, _ in seen}, seen
    return {**info, "ops": sorted(o for o, _ in seen)}


def _fsdp_model(mesh2d, x, dp_rank):
    """FSDP2 on mesh dim "dp" over a model whose parameters are replicated DTensors on "sp" and whose input
    is sequence-sharded on "sp" (the FSDP + TP/SP composition of torchtitan). Each dp rank takes its own
    batch row; the reference is the single-process model on the whole batch with the dp mean of the losses."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    model = _model()
    dp = mesh2d["dp"].size()
    ref = copy.deepcopy(model)
    loss = sum(_loss(ref(x[b:b + 1])) for b in range(dp)) / dp
    loss.backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    ref_out = ref(x[dp_rank:dp_rank + 1]).detach()

    distribute_module(model, mesh2d["sp"])
    for site in model[1:3]:
        fully_shard(site, mesh=mesh2d["dp"])
    fully_shard(model, mesh=mesh2d["dp"])
    xd = distribute_tensor(x[dp_rank:dp_rank + 1], mesh2d["sp"], [Shard(1)])
    out = model(xd)
    _loss(out.full_tensor()).backward()
    _close(out, ref_out, "forward output")
    placements = set()
    for k, p in model.named_parameters():
        placements.add(str(p.grad.placements))
        _close(p.grad, ref_grads[k], f"grad of {k}")
    assert placements == {"(Shard(dim=0), Replicate())"}, placements   # FSDP-sharded on dp, reduced over sp
    return {"params": len(ref_grads), "grad_placements": sorted(placements)}


def check_fsdp_sequence_parallel():
    from torch.distributed.device_mesh import init_device_mesh

    x = torch.randn(WORLD, S, C)
    r = {}
    # sequence sharded over both ranks, FSDP over a dp dim of one
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "sp"))
    r["sp2"] = _fsdp_model(mesh, x, 0)
    # parameters sharded over both ranks (each its own batch row), the sequence over an sp dim of one
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "sp"))
    r["dp2"] = _fsdp_model(mesh, x, mesh.get_local_rank("dp"))
    return r


def check_refusals():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    m = N * (N + 2)
    x, fn, scale, base = torch.randn(B, S, N, C), torch.randn(m, N * C) / 8, torch.ones(3), torch.zeros(m)
    rep = [distribute_tensor(t, mesh, [Replicate()]) for t in (fn, scale, base)]
    seen = {}

    def refused(fn_call, *needles, cls=mk.MHCInputError):
        try:
            fn_call()
        except cls as e:
            msg = str(e)
            for needle in needles:
                assert needle in msg, f"{needle!r} not in {msg!r}"
            return msg
        raise AssertionError("not refused")

    for dim, sym in ((3, "'C'"), (-1, "'C'"), (2, "'n'")):
        xd = distribute_tensor(x, mesh, [Shard(dim)])
        seen[f"public Shard({dim})"] = refused(lambda: mk.mhc_pre(xd, *rep), "mhc.mhc_pre", "argument 'residual'",
                                              sym, "Supported layouts", "K = n*C")
    xd = distribute_tensor(x, mesh, [Shard(3)])
    # straight through the op: DTensor wraps the rule's error; the cause is ours
    try:
        torch.ops.mhc.mhc_pre(xd, *rep)
        raise AssertionError("not refused")
    except RuntimeError as e:
        assert isinstance(e.__cause__, mk.MHCInputError) and "argument 'residual'" in str(e), repr(e)
    # under torch.compile: dynamo reports the rule's error from its fake run
    try:
        torch.compile(lambda *a: mk.mhc_pre(*a), fullgraph=True)(xd, *rep)
        raise AssertionError("not refused under torch.compile")
    except RuntimeError as e:
        assert "argument 'residual'" in str(e) and "K = n*C" in str(e), str(e)[:2000]
    # a sharded parameter (a colwise TP plan on fn)
    fd = distribute_tensor(fn, mesh, [Shard(1)])
    xs = distribute_tensor(x, mesh, [Shard(1)])
    seen["fn"] = refused(lambda: mk.mhc_pre(xs, fd, *rep[1:]), "argument 'fn'", "parameter", "replicated")
    # a C-sharded layer output into post (a TP sublayer whose output is left sharded)
    y = distribute_tensor(torch.randn(B, S, C), mesh, [Shard(2)])
    pm, cm = distribute_tensor(torch.rand(B, S, N), mesh, [Shard(1)]), distribute_tensor(
        torch.rand(B, S, N, N), mesh, [Shard(1)])
    seen["post"] = refused(lambda: mk.mhc_post(y, xs, pm, cm), "mhc.post", "argument 'layer_output'", "'C'")
    # a bad shape on DTensors: the validation error, as without DTensor
    bad = distribute_tensor(fn[:, 1:], mesh, [Replicate()])
    seen["shape"] = refused(lambda: mk.mhc_pre(xs, bad, *rep[1:]), "argument 'fn' must have shape")
    # a plain parameter beside a DTensor residual
    seen["plain"] = refused(lambda: mk.mhc_pre(xs, fn, *rep[1:]), "'fn' is a plain torch.Tensor", "DTensor")
    # a model whose residual is sharded on C
    model = _model()
    distribute_module(model, mesh)
    seen["model"] = refused(lambda: model(distribute_tensor(torch.randn(B, S, C), mesh, [Shard(2)])),
                            "argument 'hidden'", "'C'")
    return {"messages": seen}


def check_tp_partial_layer_output():
    """Tensor-parallel serving: each rank holds a partial sublayer output; post / post_pre / post_pre_sp with
    layer_output_partial=True equal the single-process boundary on the summed output, bit for bit (two
    partials: the all-reduce rounds their sum once, as the single-process add does), and the gradient reaches
    each rank's partial unchanged."""
    from mhc_kernels.reference import cases

    rank = torch.distributed.get_rank()
    info = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = cases.make_inputs("post_pre_sp", (5,), N, 33, dtype, norm_weight=True, seed=7)
        parts = [torch.randn(5, 33, generator=torch.Generator().manual_seed(100 + r)).to(dtype) for r in range(WORLD)]
        full = parts[0] + parts[1]
        mine = parts[rank].clone().requires_grad_()
        ref_y = full.clone().requires_grad_()
        x, post, comb = d["residual"], d["post_mix"], d["comb_mix"]
        site = dict(fn=d["fn"], scale=d["scale"], base=d["base"], norm_weight=d["norm_weight"])
        got = mk.mhc_post(mine, x, post, comb, layer_output_partial=True)
        want = mk.mhc_post(ref_y, x, post, comb)
        assert torch.equal(got, want), f"{dtype} post differs from the single-process boundary"
        got.float().square().sum().backward()
        want.float().square().sum().backward()
        assert torch.equal(mine.grad, ref_y.grad), f"{dtype}: the partial's gradient is the full one"
        with torch.no_grad():
            for a, b in zip(mk.post_pre(parts[rank], x, post, comb, **site, layer_output_partial=True),
                            mk.post_pre(full, x, post, comb, **site)):
                assert torch.equal(a, b), f"{dtype} post_pre differs"
            for a, b in zip(mk.post_pre_sp(parts[rank], x, post, comb, d["prev_pre"], **site,
                                           out_norm_weight=d["out_norm_weight"], layer_output_partial=True,
                                           group=torch.distributed.group.WORLD),
                            mk.post_pre_sp(full, x, post, comb, d["prev_pre"], **site,
                                           out_norm_weight=d["out_norm_weight"])):
                assert torch.equal(a, b), f"{dtype} post_pre_sp differs"
        info[str(dtype)] = "bitwise"
    return info


CHECKS = {f.__name__[len("check_"):]: f for f in (
    check_tp_partial_layer_output,
    check_rules_lazy, check_every_op, check_model_eager, check_model_tokens_and_single_pass, check_model_compile,
    check_kernel_backend, check_fsdp_sequence_parallel, check_refusals)}


def _worker(rank, port, outdir):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # op_samples
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    try:
        for name, check in CHECKS.items():
            torch.manual_seed(0)       # the same data and parameters on every rank
            t0 = time.perf_counter()
            try:
                info = check() or {}
                results[name] = {"ok": True, "info": info}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["seconds"] = round(time.perf_counter() - t0, 2)
            torch.distributed.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} distributed workers did not finish within {DEADLINE_S} s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    out = []
    for rank in range(WORLD):
        with open(os.path.join(outdir, f"rank{rank}.json")) as f:
            out.append(json.load(f))
    return out


def _passed(reports, name):
    for rank, rep in enumerate(reports):
        r = rep.get(name)
        assert r is not None, f"rank {rank} did not run {name}"
        assert r["ok"], f"rank {rank}:\n{r['error']}"
    return reports[0][name]["info"]


def test_rules_registered_lazily_on_the_first_compiled_call(reports):
    _passed(reports, "rules_lazy")


def test_every_op_on_token_sharded_dtensors(reports):
    info = _passed(reports, "every_op")
    assert set(SPECS) <= set(info["ops"])
    with_optional = [name for name, spec in SPECS.items() if any(isinstance(a, TensorArg) and a.optional
                                                                 for a in spec.args)]
    assert {f"{name} (optional tensors absent)" for name in with_optional} <= set(info["ops"])


def test_two_layer_model_sequence_sharded_eager(reports):
    info = _passed(reports, "model_eager")
    assert info["partial_grads"] > 0   # the mHC parameter gradients came back as Partial(sum)


def test_model_token_sharded_replicated_and_single_pass(reports):
    _passed(reports, "model_tokens_and_single_pass")


def test_two_layer_model_sequence_sharded_compiled(reports):
    _passed(reports, "model_compile")


def test_kernel_backend_serves_the_local_shards(reports):
    info = _passed(reports, "kernel_backend")
    if "skipped" in info:
        pytest.skip(info["skipped"])


def test_fsdp2_with_sequence_parallel(reports):
    _passed(reports, "fsdp_sequence_parallel")


def test_c_and_n_sharding_refused(reports):
    info = _passed(reports, "refusals")
    print(json.dumps(info["messages"], indent=1))


def test_tensor_parallel_partial_layer_output_equals_the_single_process_boundary(reports):
    info = _passed(reports, "tp_partial_layer_output")
    assert set(info) == {"torch.float32", "torch.bfloat16"}


def test_partial_layer_output_needs_a_process_group_and_group_needs_partial():
    x, y = torch.randn(3, N, C), torch.randn(3, C)
    post, comb = torch.rand(3, N), torch.rand(3, N, N)
    with pytest.raises(mk.MHCInputError, match="torch.distributed is not initialised"):
        mk.mhc_post(y, x, post, comb, layer_output_partial=True)
    with pytest.raises(mk.MHCInputError, match="group= is the tensor-parallel group"):
        mk.mhc_post(y, x, post, comb, group=object())


def test_import_does_not_pull_in_dtensor():
    import subprocess
    import sys

    code = "import sys, mhc_kernels; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
