"""Autotuning: config search spaces, the tuner and the per-GPU config store.

* :mod:`.space`  -- enumerate a kernel's configs for a call and prune those that cannot run
  (arch limits, divisibility, oversized tiles, the kernel's own hook);
* :mod:`.inputs` -- valid inputs for any op at any shape (and data-free calls for planning);
* :mod:`.engine` -- the tuner: compile, check against the reference, time, pick;
* :mod:`.plan` / :mod:`.sweep` -- which entries a run tunes, and running them with resume;
* :mod:`.store`  -- the atomic writer of the per-device JSON store that
  :func:`mhc_kernels.tuned.lookup` reads.

What a kernel can declare for the tuner (all optional, on :class:`mhc_kernels.registry.Kernel`):
``config_space(call)``, ``default_config(call)``, and in ``meta``: ``"prune"``
(``(call, config, arch) -> reason or None``), ``"divisibility"`` (``{config key: "T"|"n"|"C"|"K"}``)
and ``"compile"`` (``(call, config) -> None``, thread-safe ahead-of-time build, run in parallel).
A config may carry ``smem_bytes`` / ``regs_per_thread`` estimates; ``num_warps`` or ``threads`` are
checked against the thread limit.
"""
