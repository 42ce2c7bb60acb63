"""Shared test setup.

* Without a CUDA device the Triton backend runs under its interpreter, which must be
  switched on before triton is first imported.
* TileLang prints every compilation unless told not to.
* Every test gets a seed derived from its node id, so failures reproduce in isolation.
* ``served``: which backend served each op during a test.
* Under pytest-xdist each worker gets its share of the cores for torch's intra-op (OpenMP) threads: by default
  every worker's pool takes every core, and on CI's 2 cores with ``-n 2`` the pools spin against each other
  (``tests/test_reference_numerics.py`` alone: 326 s with the default, 22 s with one thread per worker).
"""

import hashlib
import os

_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:  # before torch is imported (OpenMP reads it once); subprocesses inherit it
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if _XDIST_WORKERS > 1:  # in case a plugin imported torch first
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest(), 16) % (2**31)
    torch.manual_seed(seed)
    yield


# The longest modules on CI's 2 cores (cold caches), run first: under ``-n 2 --dist loadfile`` (the README's
# command) a long module collected last would leave one worker idle at the end (longest-first scheduling).
LONGEST_FIRST = ("test_tilelang_emulated.py", "test_tilelang_compile.py", "test_compile_cli.py", "test_chains.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def served(monkeypatch):
    """The backends that served each op during the test: ``{op: {backend, ...}}`` (spies on registry.select)."""
    from mhc_kernels import registry

    seen: dict[str, set] = {}
    select = registry.select

    def spy(call):
        k = select(call)
        seen.setdefault(call.spec.name, set()).add(k.backend)
        return k

    monkeypatch.setattr(registry, "select", spy)
    return seen


@pytest.fixture
def backend(request, monkeypatch):
    """The backend named by the test's ``backend`` parameter (``backends.BACKENDS``, ``indirect=True``), the
    TileLang one with the CPU emulator switched on; the registry's caches are cleared around the test."""
    from mhc_kernels import registry

    name = request.param
    if name == "tilelang":
        from mhc_kernels.tilelang_src import EMULATE_ENV

        monkeypatch.setenv(EMULATE_ENV, "1")
    registry.clear_caches()
    yield name
    registry.clear_caches()
