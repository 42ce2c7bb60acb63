"""The ``mhc-kernels`` command line. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from .specs import ACT_DTYPE_NAMES


def _add_info(sub):
    sub.add_parser("info", help="versions, devices, backends and where tuned configs are read from")


def _add_example(sub):
    p = sub.add_parser("example", help="run one mHC site forward and backward and check it against the oracle")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", choices=list(ACT_DTYPE_NAMES), default="bf16")
    p.add_argument("--repeats", type=int, default=5)


def _add_autotune(sub):
    p = sub.add_parser("autotune", help="tune kernel configs per shape on this GPU and store them (--dry-run: plan)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP", help="ops to tune (default: all)")
    p.add_argument("--backends", nargs="+", choices=["tilelang", "triton"], default=None,
                   help="backends to tune (default: every one available on the device)")
    p.add_argument("--n", nargs="+", type=int, default=[4], help="stream counts (default: 4)")
    p.add_argument("--hidden", nargs="+", type=int, default=[4096, 7168], help="hidden widths C (default: 4096 7168)")
    p.add_argument("--tokens", nargs="+", type=int, default=[4 ** i for i in range(9)],
                   help="token counts, each tuned as its power-of-two bucket (default: 1 4 16 ... 65536)")
    p.add_argument("--dtype", nargs="+", choices=list(ACT_DTYPE_NAMES), default=["bf16"])
    p.add_argument("--out", default=None, help="config directory (default: the user config dir)")
    p.add_argument("--resume", action="store_true", help="skip entries already in the store (and current)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (configs per op after pruning); needs no GPU")
    p.add_argument("--arch", type=int, default=None, help="target compute capability for pruning, e.g. 90 "
                                                          "(default: the device's, else 90)")
    p.add_argument("--device", default=None, help="CUDA device (default: the current one)")
    p.add_argument("--repeats", type=int, default=50, help="timed launches per config (median is kept)")
    p.add_argument("--warmup", type=int, default=10, help="untimed launches before timing")


def _add_bench(sub):
    p = sub.add_parser("bench", help="latency/bandwidth benchmarks and roofline report (JSON, CSV, Markdown, PNG)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   help="ops: names, or all, fwd, bwd, fused (mhc_pre, post_pre, mhc_site), single_pass "
                        "(mhc_pre_sp, post_pre_sp, mhc_head_sp and backward); comma lists work")
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends (default: the available ones; on CPU the reference only)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="also time each backend's forward ops in batch-invariant mode (impl '<backend>+bi'): the "
                        "mode's cost")
    p.add_argument("--fp8", action="store_true",
                   help="also time each backend's boundary ops writing the FP8 copy of the layer input (impl "
                        "'<backend>+fp8', e4m3_g128, or e4m3_g32 where C is no multiple of 128): the copy's cost, "
                        "its bytes counted")
    p.add_argument("--baselines", nargs="+", default=None,
                   help="eager, compile or none (default: both; --quick: eager)")
    p.add_argument("--tokens", nargs="+", default=None, help="token counts T (default: 1 16 256 ... 65536)")
    p.add_argument("--hidden", nargs="+", default=None, help="hidden widths C (default: 1280 4096 7168)")
    p.add_argument("--n", nargs="+", default=None, help="stream counts (default: 2 4 8)")
    p.add_argument("--dtype", choices=list(ACT_DTYPE_NAMES), default="bf16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--quick", action="store_true",
                   help="sub-minute run: T in {1, 1024}, n=4, C=1280 against the eager baseline; on CPU the "
                        "reference backend, on CUDA every available backend")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="print the change against an earlier run")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --quick on CPU: 1)")
    p.add_argument("--decode", action="store_true",
                   help="decode latency instead: µs per boundary (post_pre, post_pre_sp with the sublayer norm) at "
                        "T in {1, 2, 4, 8, 16, 64} (or --tokens), eager and replayed from a CUDA graph")


def _add_compile(sub):
    p = sub.add_parser("compile", help="compile every GPU kernel ahead of time for real targets (no GPU needed) and "
                                       "report registers, spills and shared memory")
    p.add_argument("--backend", choices=["triton", "tilelang", "all"], default="all")
    p.add_argument("--arch", action="append", choices=["sm_80", "sm_90a", "sm_100a", "emulated"], default=None,
                   help="target architecture; repeat for several (default: sm_90a); 'emulated' (--fill-cache only): "
                        "the CPU emulator's cache, for MHC_TILELANG_EMULATE=1 runs")
    p.add_argument("--n", type=int, default=4, help="stream count (default: 4)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden width C (default: 4096)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="TileLang: the token counts T to build the run-time kernels for (default: 4096); the split "
                        "counts and tail layouts depend on T")
    p.add_argument("--sms", type=int, default=None,
                   help="TileLang: the SM count configs are planned for (default: the arch's usual GPU: 108 for "
                        "sm_80, 132 for sm_90a, 148 for sm_100a)")
    p.add_argument("--dtype", choices=list(ACT_DTYPE_NAMES), default="bf16")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as JSON")
    p.add_argument("--emit-dir", default=None, metavar="DIR", help="write each kernel's PTX (and cubin) here")
    p.add_argument("--fill-cache", action="store_true",
                   help="TileLang: build the kernels a run will ask for (--for) into TileLang's kernel cache "
                        "($TILELANG_CACHE_DIR, default ~/.tilelang/cache; 'emulated': $MHC_KERNELS_CACHE), for a GPU "
                        "machine to reuse; no resource report")
    p.add_argument("--for", dest="plan", default="selftest",
                   choices=["selftest", "gpu-tests", "check", "bench"],
                   help="--fill-cache: which run to fill the cache for (default: selftest = check + bench --quick + "
                        "the gpu_smoke shapes + the serving stage's benchmarks; gpu-tests: check, bench --quick "
                        "and the full GPU tier's shapes)")
    p.add_argument("--ops", nargs="+", default=None, help="--fill-cache: only these ops (default: every op)")
    p.add_argument("--jobs", type=int, default=1, help="--fill-cache: parallel builds (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="--fill-cache: record and count the kernels, build nothing")
    p.add_argument("--keys-out", default=None, metavar="PATH", help="--fill-cache: also write the recorded keys here")


def _add_demo(sub):
    p = sub.add_parser("demo", help="train a small transformer three ways (residual, HC, mHC) on CPU and compare "
                                    "loss, grad norm and Amax gain")
    p.add_argument("--steps", type=int, default=100,
                   help="training steps per variant (default: 100, about a minute on a 2-core CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json (and amax_gain.png when matplotlib is installed) here")
    p.add_argument("--layers", type=int, default=8, help="transformer layers (2 mHC sites each; default: 8)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width C (default: 128)")
    p.add_argument("--n", type=int, default=4, help="residual streams (default: 4)")
    p.add_argument("--interval", type=int, default=None, help="steps between tables (default: steps/5)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")


def _add_check(sub):
    p = sub.add_parser("check", help="run every available backend's correctness suite against the float64 oracle "
                                     "(exit 1 on any failure)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help="backends to check (default: every backend available on the device)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP", help="ops to check (default: all)")
    p.add_argument("--verbose", action="store_true", help="one row per case instead of one per op")


def _add_selftest(sub):
    p = sub.add_parser("selftest", help="the acceptance run of a new machine in a time budget: environment, check of "
                                        "every backend, the GPU test tier, bench --quick, the serving numbers "
                                        "(selftest.json/.md)")
    p.add_argument("--time-budget", type=float, default=480, help="seconds for the whole run (default: 480)")
    p.add_argument("--out", default="selftest-results", help="output directory (default: selftest-results)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--skip", nargs="+", choices=["check", "tests", "bench", "serving"], default=None,
                   help="stages to leave out")


COMMANDS = {"info": _add_info, "selftest": _add_selftest, "autotune": _add_autotune, "example": _add_example,
            "bench": _add_bench, "compile": _add_compile, "demo": _add_demo, "check": _add_check}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-kernels",
                                     description="Fused, autotuned kernels for Manifold-Constrained Hyper-Connections")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mhc-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"mhc_kernels.commands.{args.command}")
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
