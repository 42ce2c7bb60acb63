"""Subcommands of the ``mhc-kernels`` CLI, one module each, imported only when run."""

from __future__ import annotations


class CommandError(SystemExit):
    """A clear one-line refusal of a command (exit status 2), printed instead of a traceback."""

    def __init__(self, command: str, message: str):
        import sys

        print(f"mhc-kernels {command}: {message}", file=sys.stderr)
        super().__init__(2)


def device_for(command: str, requested):
    """The device a command runs on: ``requested`` (``cpu``, ``cuda``, ``cuda:1``), else CUDA when present, else
    CPU; a CUDA device that is not there is refused in one line, exit 2."""
    import torch

    try:
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CommandError(command, f"--device {requested!r} is not a device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else f"torch {torch.__version__} sees no CUDA device")
            raise CommandError(command, f"no CUDA device ({why}); run with --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(command, f"no CUDA device {device.index} (there are {torch.cuda.device_count()})")
    return device


def positive(command: str, **values) -> None:
    """Each of ``values`` (a CLI size such as --tokens) must be an int >= 1."""
    for name, v in values.items():
        if v is None:
            continue
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x < 1:
                raise CommandError(command, f"--{name} must be >= 1; got {x}")
