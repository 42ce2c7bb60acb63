"""The ``mhc-kernels`` command line. Each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys


def _add_info(sub):
    sub.add_parser("info", help="versions, devices, backends and where tuned configs are read from")


def _add_example(sub):
    p = sub.add_parser("example", help="run one mHC site forward and backward and check it against the oracle")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)


COMMANDS = {"info": _add_info, "example": _add_example}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-kernels",
                                     description="Fused, autotuned kernels for Manifold-Constrained Hyper-Connections")
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
