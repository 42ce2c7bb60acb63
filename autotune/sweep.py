"""Running a planned sweep: tune each entry, store each winner at once, skip finished ones on resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mhc_kernels import tuned

from . import engine


@dataclass
class SweepReport:
    results: list = field(default_factory=list)     # TuneResult with a winner, in sweep order
    failures: list = field(default_factory=list)    # (Entry, why)
    skipped: list = field(default_factory=list)     # entries already done (resume)


def pending(entries, store, resume: bool):
    """``(todo, skipped)``: with ``resume``, entries the store already holds a current config for are skipped."""
    if not resume:
        return list(entries), []
    todo, skipped = [], []
    for e in entries:
        (skipped if store.is_done(e.op, e.backend, e.dtype, e.n, e.C, e.T) else todo).append(e)
    return todo, skipped


def _free(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(entries, store, tuner: engine.Tuner, device, *, resume: bool = False,
              on_start: Optional[Callable] = None, on_done: Optional[Callable] = None) -> SweepReport:
    """Tune ``entries`` (from :func:`.plan.plan`) on ``device``; the store is saved after every winner.

    ``on_start(entry)`` / ``on_done(entry)`` drive a progress display.
    """
    rep = SweepReport()
    todo, rep.skipped = pending(entries, store, resume)
    try:
        for e in todo:
            if on_start is not None:
                on_start(e)
            try:
                res = tuner.tune(e.kernel, e.op, e.T, e.n, e.C, e.act_dtype, device)
            except Exception as ex:  # noqa: BLE001  (one bad entry must not end the sweep)
                rep.failures.append((e, f"{type(ex).__name__}: {ex}"))
            else:
                if engine.store_result(store, res) is None:
                    why = "; ".join(sorted({f"{c.status}: {c.reason}"[:120] for c in res.candidates
                                            if c.status not in ("timed", "pruned")}))[:300]
                    rep.failures.append((e, f"no config passed the check ({why or 'no candidates'})"))
                else:
                    store.save()
                    rep.results.append(res)
            _free(device)
            if on_done is not None:
                on_done(e)
    finally:
        tuned.clear_cache()  # this process reads the new configs from now on
    return rep
