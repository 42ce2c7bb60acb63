"""``mhc-kernels check``: every available backend's correctness suite against the float64 oracle.

For each backend available on the device (or the ones named), every public operator of
:data:`mhc_kernels.reference.cases.CASES` runs on a few curated shapes -- forward against the
NumPy float64 oracle and backward against autograd through the float64 transcription, under
the tolerances of :mod:`mhc_kernels.reference.cases` (``multilayer_recompute``, which has no
autograd, forward only, with 3 and 1 layers). The backend is forced (``use_backend``) for the
forward and the backward.

Outcomes per case: ``pass``; ``FAIL`` (an error outside the tolerance, or an exception);
``skipped`` when the backend has no kernel for the op yet ("not implemented") or declares
the shape unsupported. Exit status 1 when anything failed (or a backend named with
``--backends`` cannot run on the device), else 0.

Shapes are small where kernels are slow: on CPU the Triton backend runs only under
``TRITON_INTERPRET=1`` (set before triton is imported), the TileLang backend only under
``MHC_TILELANG_EMULATE=1`` (its generated CUDA compiled as host C++ on CPU threads), and
both get a couple of tokens per case.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import mhc_kernels as mk
from mhc_kernels.commands import device_for
from mhc_kernels.errors import BackendError
from mhc_kernels.reference import cases

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (lead dims, n, C, dtype, norm_weight, constants[, L for multilayer_recompute])
_CPU_CASES = [
    ((5,), 4, 64, BF16, True, {}),
    ((2, 3), 4, 7, FP32, False, cases.LOUD_CONSTS),
    ((3,), 2, 33, FP16, True, {"sinkhorn_iters": 2}),
]
_INTERPRETER_CASES = [  # the Triton interpreter / TileLang emulator cost ms per program instance
    ((2,), 4, 40, BF16, True, {}),
    ((1, 3), 2, 7, FP32, False, cases.LOUD_CONSTS),
]
_CUDA_CASES = [
    ((257,), 4, 1280, BF16, True, {}),
    ((3, 11), 4, 4096, BF16, False, {}),
    ((33,), 8, 96, FP16, True, {"sinkhorn_iters": 2}),
    ((5,), 4, 7, FP32, False, cases.LOUD_CONSTS),
]
_RECOMPUTE_L = (3, 1)


@dataclass
class Outcome:
    backend: str
    op: str
    case: str
    status: str  # pass | FAIL | skipped
    max_abs_err: float = 0.0
    worst_ratio: float = 0.0
    detail: str = ""


@dataclass
class OpSummary:
    backend: str
    op: str
    outcomes: list = field(default_factory=list)

    @property
    def status(self) -> str:
        st = [o.status for o in self.outcomes]
        if "FAIL" in st:
            return "FAIL"
        if all(s == "skipped" for s in st):
            return "skipped"
        return "pass"


def _case_label(lead, n, C, dtype, nw, consts, L=None) -> str:
    s = f"lead={lead} n={n} C={C} {str(dtype).replace('torch.', '')}"
    if nw:
        s += " +norm_weight"
    if consts:
        s += " loud" if consts == cases.LOUD_CONSTS else " " + ",".join(f"{k}={v}" for k, v in consts.items())
    if L is not None:
        s += f" L={L}"
    return s


def _classify(e: Exception) -> tuple[str, str]:
    msg = str(e)
    if isinstance(e, BackendError):
        if "has no kernel for op" in msg:
            op = msg.split("has no kernel for op", 1)[1].strip().strip("'\"")
            return "skipped", f"not implemented ({op})"
        if "cannot serve this call" in msg:
            return "skipped", "unsupported: " + msg.split("): ", 1)[-1]
    return "FAIL", f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def _run_case(backend, op, device, spec) -> Outcome:
    lead, n, C, dtype, nw, consts = spec[:6]
    L = spec[6] if len(spec) > 6 else None
    label = _case_label(lead, n, C, dtype, nw, consts, L)
    try:
        with mk.use_backend(backend):
            inputs = cases.make_inputs(op, lead, n, C, dtype, device, norm_weight=nw, consts=consts, L=L or 1)
            res = cases.check_forward(mk, op, inputs) + cases.check_backward(mk, op, inputs)
    except Exception as e:  # noqa: BLE001 -- every failure becomes a row
        status, detail = _classify(e)
        if status == "FAIL" and not isinstance(e, (BackendError, mk.MHCError)):
            detail += " | " + traceback.format_exc(limit=-1).strip().splitlines()[-2].strip()
        return Outcome(backend, op, label, status, detail=detail)
    worst = max(res, key=lambda r: r.worst_ratio)
    bad = [r for r in res if not r.ok]
    return Outcome(backend, op, label, "FAIL" if bad else "pass", max(r.max_abs_err for r in res),
                   worst.worst_ratio, f"{worst.name}: {worst.detail}" if bad else "")


def _cases_for(backend: str, device: torch.device):
    """The case table of ``backend`` on ``device`` (a device type: ``"cuda"`` or ``"cpu"``)."""
    if device.type == "cuda":
        return _CUDA_CASES
    if backend in ("triton", "tilelang"):
        return _INTERPRETER_CASES
    return _CPU_CASES


def run_checks(device, backends: Optional[list] = None, ops: Optional[list] = None, *,
               cases_device: Optional[str] = None):
    """-> (summaries, unavailable {backend: reason}, explicitly requested). ``cases_device``: run the case table
    of that device type instead of ``device``'s (``compile --fill-cache`` replays the GPU's table on CPU)."""
    device = torch.device(device)
    table_device = torch.device(cases_device) if cases_device else device
    status = mk.available_backends(device)
    requested = backends is not None
    names = backends or list(status)
    unknown = [b for b in names if b not in status]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; known: {', '.join(status)}")
    all_ops = list(cases.CASES)
    ops = ops or all_ops
    bad_ops = [o for o in ops if o not in all_ops]
    if bad_ops:
        raise SystemExit(f"unknown op(s) {bad_ops}; known: {', '.join(all_ops)}")
    summaries, unavailable = [], {}
    for b in names:
        if not status[b].available:
            unavailable[b] = status[b].reason
            continue
        for op in ops:
            s = OpSummary(b, op)
            for i, spec in enumerate(_cases_for(b, table_device)):
                if op == cases.RECOMPUTE_OP:
                    spec = tuple(spec) + (_RECOMPUTE_L[i % len(_RECOMPUTE_L)],)
                s.outcomes.append(_run_case(b, op, device, spec))
            summaries.append(s)
    return summaries, unavailable, requested


_STYLE = {"pass": "[green]pass[/]", "FAIL": "[bold red]FAIL[/]", "skipped": "[yellow]skipped[/]"}


def run(args) -> int:
    con = Console()
    con = Console(width=max(con.width, 140))  # the table is wide; don't fold op names in a narrow pipe
    device = device_for("check", args.device)
    t0 = time.perf_counter()
    summaries, unavailable, requested = run_checks(device, args.backends, args.ops)
    tab = Table(title=f"mhc-kernels check on {device}: backends vs the float64 oracle (forward and backward)")
    for col in ("backend", "op", "cases", "result", "max abs err", "worst err/tol"):
        tab.add_column(col, no_wrap=True)
    tab.add_column("note", overflow="fold")
    failed = 0
    for s in summaries:
        rows = s.outcomes if args.verbose else [None]
        for o in rows:
            items = s.outcomes if o is None else [o]
            st = s.status if o is None else o.status
            ran = [x for x in items if x.status != "skipped"]
            notes = sorted({x.detail for x in items if x.status != "pass" and x.detail})
            tab.add_row(s.backend, s.op, f"{len(ran)}/{len(items)}" if o is None else o.case, _STYLE[st],
                        f"{max(x.max_abs_err for x in ran):.3g}" if ran else "-",
                        f"{max(x.worst_ratio for x in ran):.3g}" if ran else "-", escape("; ".join(notes)[:300]))
        failed += sum(o.status == "FAIL" for o in s.outcomes)
    for b, reason in unavailable.items():
        tab.add_row(b, "*", "-", "[bold red]FAIL[/]" if requested else "[dim]unavailable[/]", "-", "-", escape(reason))
    con.print(tab)
    n_cases = sum(len(s.outcomes) for s in summaries)
    n_skip = sum(o.status == "skipped" for s in summaries for o in s.outcomes)
    msg = (f"{n_cases} cases: {n_cases - failed - n_skip} passed, {failed} failed, {n_skip} skipped "
           f"in {time.perf_counter() - t0:.1f} s (err/tol <= 1 passes)")
    bad = failed or (requested and unavailable)
    con.print(("[bold red]FAILED[/] " if bad else "[green]OK[/] ") + msg)
    return 1 if bad else 0
