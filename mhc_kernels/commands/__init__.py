"""Subcommands of the ``mhc-kernels`` CLI, one module each, imported only when run."""
