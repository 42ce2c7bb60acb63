"""``mhc-kernels autotune``: tune every kernel's config per shape on this GPU and store the winners.

Sweeps (op, backend, dtype, n, C, token bucket); for each entry the tuner prunes
the kernel's config space for the device's arch, compiles, checks every candidate
against the reference backend, times the survivors and keeps the fastest (see
:mod:`mhc_kernels.autotune.engine`). Results go to one JSON file per device model
in ``--out`` (default: the user config dir, which the kernels read at run time),
saved atomically after every entry, so an interrupted sweep loses at most one
entry and ``--resume`` picks up where it stopped.

Timing needs a CUDA device. ``--dry-run`` needs none: it prints the plan (entries
and configs per kernel after pruning for ``--arch``) on any machine.
"""

from __future__ import annotations

import sys

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mhc_kernels import registry, tuned
from mhc_kernels.autotune import engine, space, sweep
from mhc_kernels.autotune import plan as plan_mod
from mhc_kernels.autotune.store import ConfigStore, store_path
from mhc_kernels.specs import DTYPES_BY_NAME, dtype_name

NO_GPU = ("mhc-kernels autotune: timing kernels needs a CUDA device, and none is present "
          "(torch.cuda.is_available() is False). Run it on the GPU you want configs for; "
          "`mhc-kernels autotune --dry-run` shows the plan on any machine.")


def _shape(e) -> str:
    return f"{dtype_name(e.dtype)} n={e.n} C={e.C} T={e.T}"


def _parse_ops(con, names):
    ops = names or plan_mod.all_ops()
    bad = [o for o in ops if o not in plan_mod.all_ops()]
    if bad:
        con.print(f"[red]unknown op(s): {', '.join(bad)}[/]; known: {', '.join(plan_mod.all_ops())}")
        return None
    return ops


def _dry_run(con: Console, args, ops) -> int:
    arch = args.arch or space.device_arch() or space.DEFAULT_ARCH
    backends = args.backends or list(plan_mod.TUNABLE_BACKENDS)
    dtypes = [DTYPES_BY_NAME[d] for d in args.dtype]
    plans = plan_mod.plan(ops, backends, dtypes, args.n, args.hidden, args.tokens, arch)
    gpu = tuned.device_identity("cuda")["name"] if torch.cuda.is_available() else None
    con.print(f"[bold]autotune plan[/] for sm_{arch} ({gpu or 'no CUDA device here: plan only'}); "
              f"tokens {', '.join(map(str, args.tokens))}; hidden {', '.join(map(str, args.hidden))}; "
              f"n {', '.join(map(str, args.n))}; {', '.join(args.dtype)}")
    t = Table(title="configs per entry after pruning (declared -> kept)")
    for col, j in (("op", "left"), ("backend", "left"), ("entries", "right"), ("configs", "right"),
                   ("timed runs", "right"), ("pruned because", "left")):
        t.add_column(col, justify=j)
    total_entries = total_cands = 0
    notes: dict[tuple, list] = {}
    for backend in backends:
        for kp in (kp for kp in plans if kp.backend == backend):
            if not kp.entries:
                why = kp.note or "; ".join(sorted({r for _, r in kp.unsupported}))
                notes.setdefault((backend, why), []).append(kp.op)
                continue
            declared = [e.pruned.total for e in kp.entries]
            kept = [len(e.pruned.kept) for e in kp.entries]
            rng = (lambda xs: str(min(xs)) if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}")  # noqa: E731
            note = plan_mod.summarize_reasons(kp.entries)
            if kp.unsupported:
                note = (note + "; " if note else "") + f"{len(kp.unsupported)} shapes unsupported"
            t.add_row(kp.op, backend, str(len(kp.entries)), f"{rng(declared)} -> {rng(kept)}", str(sum(kept)),
                      note or "")
            total_entries += len(kp.entries)
            total_cands += sum(kept)
    if t.row_count:
        con.print(t)
    for (backend, why), names in notes.items():
        which = "every op" if len(names) == len(ops) else ", ".join(names)
        con.print(f"[yellow]{backend}[/]: nothing to tune for {which}: {escape(why)}")
    out = args.out or tuned.user_config_dir()
    con.print(f"{total_entries} entries, {total_cands} candidate configs to check and time; results would go to "
              f"{store_path(out, gpu) if gpu else out + '/<device name>.json'}")
    return 0


def run(args) -> int:
    con = Console()
    ops = _parse_ops(con, args.ops)
    if ops is None:
        return 2
    if args.dry_run:
        return _dry_run(con, args, ops)
    if not torch.cuda.is_available():
        Console(stderr=True).print(f"[red]{NO_GPU}[/]")
        return 2

    device = torch.device(args.device or "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    identity = tuned.device_identity(device)
    arch = args.arch or space.device_arch(device)
    status = registry.available_backends(device)
    if args.backends:
        backends = args.backends
        for b in backends:
            if not status[b].available:
                con.print(f"[red]backend {b} cannot run on {device}: {escape(status[b].reason)}[/]")
                return 2
    else:
        backends = [b for b in plan_mod.TUNABLE_BACKENDS if status[b].available]
        for b in plan_mod.TUNABLE_BACKENDS:
            if not status[b].available:
                con.print(f"[yellow]skipping backend {b}: {escape(status[b].reason)}[/]")
    out = args.out or tuned.user_config_dir()
    store = ConfigStore.for_device(out, identity)
    plans = plan_mod.plan(ops, backends, [DTYPES_BY_NAME[d] for d in args.dtype], args.n, args.hidden, args.tokens,
                          arch, target=device)
    entries = [e for kp in plans for e in kp.entries]
    todo, skipped = sweep.pending(entries, store, args.resume)
    con.print(f"tuning {len(todo)} entries on {identity['name']} (sm_{arch}, {identity['sm_count']} SMs)"
              + (f"; {len(skipped)} already done (--resume)" if skipped else "") + f" -> {store.path}")

    timer = engine.CudaTimer(warmup=args.warmup, repeats=args.repeats)
    tuner = engine.Tuner(timer=timer, arch=arch)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=con) as prog:
        task = prog.add_task("autotune", total=len(todo))
        rep = sweep.run_sweep(todo, store, tuner, device,
                              on_start=lambda e: prog.update(task, description=f"{e.op} [{e.backend}] {_shape(e)}"),
                              on_done=lambda e: prog.advance(task))
    results, failures = rep.results, rep.failures

    t = Table(title=f"tuned configs on {identity['name']} ({results[0].timing if results else 'no results'})")
    for col, j in (("op", "left"), ("backend", "left"), ("shape", "left"), ("best config", "left"),
                   ("µs", "right"), ("GB/s", "right"), ("vs default", "right"), ("checked/timed", "right")):
        t.add_column(col, justify=j)
    for r in results:
        sp = r.speedup
        ok = sum(c.status == "timed" for c in r.candidates)
        t.add_row(r.op, r.backend, f"{dtype_name(r.dtype)} n={r.n} C={r.C} T={r.T}",
                  space.format_config(r.best.config), f"{r.best.us:.2f}", f"{r.gbps:.0f}",
                  "-" if sp is None else f"{sp:.2f}x", f"{ok}/{len(r.candidates)}")
    con.print(t)
    for e, why in failures:
        con.print(f"[red]{escape(f'{e.op} [{e.backend}] {_shape(e)}: {why}')}[/]")
    con.print(f"wrote {len(results)} entries to {store.path}")
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    from mhc_kernels.cli import main

    sys.exit(main(["autotune"] + sys.argv[1:]))
