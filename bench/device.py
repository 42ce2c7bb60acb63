"""Device model for the benchmarks: what the hardware can do, and where each number came from.

Two kinds of ceiling:

* **datasheet** peaks of known NVIDIA GPUs (:data:`GPU_PEAKS`): HBM/GDDR bandwidth
  and dense (no structured sparsity) bf16 / tf32 tensor-core and fp32 CUDA-core
  FLOP/s, looked up by the longest matching prefix of the device name (so
  ``"NVIDIA H200"`` is not taken for ``"NVIDIA H20"``). Where torch exposes the
  memory clock and bus width (``torch.cuda.get_device_properties``, torch >= 2.7)
  the theoretical DRAM bandwidth ``2 * clock * width / 8`` is recorded beside it as
  a cross-check; a disagreement of more than 15% is noted in the report (a board
  variant the table does not know, or a clock-capped part).
* a **measured** copy bandwidth, taken on the spot: a large device-to-device
  ``dst.copy_(src)`` into a preallocated buffer (bytes counted = read + write),
  median over repeats. On CPU this is the host memory copy bandwidth, and it is the
  only ceiling there (peak FLOP/s of a CPU is left unknown).

An unknown GPU gets the measured ceiling only, with a note, never an error.
Every ceiling carries a ``source`` string that the reports print next to it.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

# Datasheet values (NVIDIA product briefs/datasheets), dense.  Bandwidth in GB/s
# (decimal), FLOP/s in TFLOP/s.  Keys are matched against the normalised device
# name by longest prefix; see :func:`normalise_name`.
_SRC = "NVIDIA datasheet"
GPU_PEAKS: dict[str, dict] = {
    # Hopper
    "H100 80GB HBM3": dict(label="H100 SXM5 80GB", bw=3350, bf16=989.4, tf32=494.7, fp32=66.9),
    "H100 SXM": dict(label="H100 SXM5 80GB", bw=3350, bf16=989.4, tf32=494.7, fp32=66.9),
    "H100 PCIe": dict(label="H100 PCIe 80GB", bw=2000, bf16=756.5, tf32=378.0, fp32=51.2),
    "H100 NVL": dict(label="H100 NVL 94GB", bw=3900, bf16=835.0, tf32=417.5, fp32=60.0),
    "H100": dict(label="H100 (variant not identified; SXM5 values)", bw=3350, bf16=989.4, tf32=494.7,
                 fp32=66.9),
    "H200 NVL": dict(label="H200 NVL 141GB", bw=4800, bf16=835.0, tf32=417.5, fp32=60.0),
    "H200": dict(label="H200 SXM 141GB", bw=4800, bf16=989.4, tf32=494.7, fp32=66.9),
    "H20": dict(label="H20 96GB", bw=4000, bf16=148.0, tf32=74.0, fp32=44.0),
    # Ampere
    "A100 SXM4 80GB": dict(label="A100 SXM4 80GB", bw=2039, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100 SXM4 40GB": dict(label="A100 SXM4 40GB", bw=1555, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100 80GB PCIe": dict(label="A100 PCIe 80GB", bw=1935, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100 PCIE 80GB": dict(label="A100 PCIe 80GB", bw=1935, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100 PCIE 40GB": dict(label="A100 PCIe 40GB", bw=1555, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100 40GB PCIe": dict(label="A100 PCIe 40GB", bw=1555, bf16=312.0, tf32=156.0, fp32=19.5),
    "A100": dict(label="A100 (variant not identified; SXM4 40GB values)", bw=1555, bf16=312.0, tf32=156.0,
                 fp32=19.5),
    # Blackwell
    "B200": dict(label="B200 (HGX, per GPU)", bw=8000, bf16=2250.0, tf32=1100.0, fp32=75.0),
    # Ada
    "L40S": dict(label="L40S 48GB", bw=864, bf16=362.05, tf32=183.0, fp32=91.6),
    "GeForce RTX 4090": dict(label="GeForce RTX 4090 (fp32-accumulate tensor rate)", bw=1008, bf16=165.2,
                             tf32=82.6, fp32=82.6),
}
PEAK_DTYPES = ("bf16", "tf32", "fp32")


def normalise_name(name: str) -> str:
    """Case-insensitive, vendor prefix dropped, ``-``/``_``/runs of spaces as one space."""
    s = re.sub(r"[\s_\-]+", " ", name.strip()).lower()
    for vendor in ("nvidia ",):
        if s.startswith(vendor):
            s = s[len(vendor):]
    return s


@dataclass(frozen=True)
class PeakEntry:
    key: str
    label: str
    bw_gbps: float
    tflops: dict


def lookup_peaks(name: str) -> Optional[PeakEntry]:
    """The table entry whose key is the longest prefix of ``name`` (normalised), or None.

    A key must end at a word boundary of the name, so ``H20`` does not match ``H200``.
    """
    norm = normalise_name(name)
    best = None
    for key in GPU_PEAKS:
        k = normalise_name(key)
        if norm == k or (norm.startswith(k) and not norm[len(k)].isalnum()):
            if best is None or len(k) > len(normalise_name(best)):
                best = key
    if best is None:
        return None
    v = GPU_PEAKS[best]
    return PeakEntry(best, v["label"], float(v["bw"]), {d: float(v[d]) for d in PEAK_DTYPES})


# -- measured copy bandwidth ----------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device | str, nbytes: Optional[int] = None, repeats: int = 10,
                           warmup: int = 2) -> tuple[float, str]:
    """Median copy bandwidth in GB/s (read + write counted) and a description of how it was taken.

    GPU: ``dst.copy_(src)`` of 1 GiB (or ``nbytes``), timed with CUDA events per repeat.
    CPU: the same into a preallocated host buffer (default 256 MiB, at least 8x a
    typical last-level cache), timed with ``time.perf_counter``.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    moved = 2 * numel * 4
    times = []
    if device.type == "cuda":
        for _ in range(warmup):
            dst.copy_(src)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        _sync(device)
        for s, e in zip(starts, ends):
            s.record()
            dst.copy_(src)
            e.record()
        _sync(device)
        times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
        how = f"device-to-device copy of {nbytes / 2**20:.0f} MiB, CUDA events, median of {repeats}"
    else:
        for _ in range(warmup):
            dst.copy_(src)
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        how = (f"host memory copy of {nbytes / 2**20:.0f} MiB into a preallocated buffer, "
               f"{torch.get_num_threads()} thread(s), wall clock, median of {repeats}")
    del src, dst
    return moved / statistics.median(times) / 1e9, how


# -- the device model -------------------------------------------------------------
@dataclass
class DeviceModel:
    """Ceilings of one device and where each came from (all bandwidths GB/s, FLOP/s in TFLOP/s)."""

    device_type: str
    name: str
    measured_bw_gbps: Optional[float] = None
    measured_bw_source: str = ""
    datasheet_bw_gbps: Optional[float] = None
    datasheet_tflops: dict = field(default_factory=dict)  # {"bf16": .., "tf32": .., "fp32": ..}
    datasheet_source: str = ""
    theoretical_bw_gbps: Optional[float] = None  # memory clock x bus width, where torch exposes them
    theoretical_bw_source: str = ""
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    # The bandwidth ceiling the reports use for "% of peak" and the roofline time:
    # the measured copy bandwidth (what a memory-bound kernel can reach in practice,
    # DESIGN section 5), falling back to the datasheet.
    @property
    def ceiling_gbps(self) -> Optional[float]:
        return self.measured_bw_gbps if self.measured_bw_gbps else self.datasheet_bw_gbps

    @property
    def ceiling_source(self) -> str:
        if self.measured_bw_gbps:
            return f"measured: {self.measured_bw_source}"
        if self.datasheet_bw_gbps:
            return f"datasheet: {self.datasheet_source}"
        return "none"

    def compute_ceiling(self, precision: str = "fp32") -> tuple[Optional[float], str]:
        """Peak TFLOP/s for ``precision`` and its source; (None, why) when unknown."""
        v = self.datasheet_tflops.get(precision)
        if v is None:
            return None, (f"unknown for {self.name}" if self.device_type == "cuda"
                          else "unknown (CPU peak FLOP/s is not modelled)")
        return v, f"datasheet {precision}, dense: {self.datasheet_source}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ceiling_gbps"] = self.ceiling_gbps
        d["ceiling_source"] = self.ceiling_source
        return d


ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def cpu_allocator_note(environ=None) -> Optional[str]:
    """A note for CPU reports when large allocations go straight back to the OS.

    With glibc's defaults every tensor over the mmap threshold is a fresh ``mmap`` and its
    first touch page-faults, which on CPU costs more than the arithmetic of the mHC ops (one
    site fwd+bwd, T=4096 n=4 C=1024 bf16, 1 thread: 653 ms -> 238 ms with :data:`ALLOCATOR_ENV`).
    ``None`` when the process already runs with those settings or a caching allocator preloaded.
    """
    env = os.environ if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in env or any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc")):
        return None
    setting = " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())
    return ("CPU timings include page faults of fresh large allocations (glibc returns them to the OS); "
            f"for CPU-side speed run with {setting} or preload jemalloc/tcmalloc (times then drop 2-3x)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def gpu_properties_bandwidth(props) -> Optional[float]:
    """Theoretical DRAM bandwidth (GB/s) from ``memory_clock_rate`` (kHz) and ``memory_bus_width`` (bits)."""
    clock = getattr(props, "memory_clock_rate", 0) or 0
    width = getattr(props, "memory_bus_width", 0) or 0
    if clock <= 0 or width <= 0:
        return None
    return 2 * clock * 1e3 * width / 8 / 1e9


def datasheet_model(device_type: str, name: str, props=None) -> DeviceModel:
    """The model without measuring anything (used by :func:`describe_device` and the tests)."""
    dm = DeviceModel(device_type=device_type, name=name)
    if device_type != "cuda":
        dm.notes.append("CPU: the ceiling is the measured host memory copy bandwidth; peak FLOP/s unknown")
        return dm
    entry = lookup_peaks(name)
    if entry is None:
        dm.notes.append(f"'{name}' is not in the datasheet table; only the measured copy bandwidth is used "
                        f"(add it to mhc_kernels.bench.device.GPU_PEAKS)")
    else:
        dm.datasheet_bw_gbps = entry.bw_gbps
        dm.datasheet_tflops = dict(entry.tflops)
        dm.datasheet_source = f"{_SRC}, {entry.label} (table key '{entry.key}')"
    if props is not None:
        theo = gpu_properties_bandwidth(props)
        if theo is not None:
            dm.theoretical_bw_gbps = theo
            dm.theoretical_bw_source = (f"memory clock {props.memory_clock_rate / 1e3:.0f} MHz x "
                                        f"{props.memory_bus_width}-bit bus x 2 (DDR)")
            if dm.datasheet_bw_gbps and abs(theo / dm.datasheet_bw_gbps - 1) > 0.15:
                dm.notes.append(f"device properties give {theo:.0f} GB/s, datasheet {dm.datasheet_bw_gbps:.0f} "
                                f"GB/s: check the variant")
    return dm


def describe_device(device: torch.device | str, measure: bool = True, copy_bytes: Optional[int] = None,
                    repeats: int = 10) -> DeviceModel:
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        dm = datasheet_model("cuda", props.name, props)
        dm.extra = {"sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
    else:
        dm = datasheet_model("cpu", _cpu_name())
        dm.extra = {"logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if measure:
        try:
            dm.measured_bw_gbps, dm.measured_bw_source = measure_copy_bandwidth(device, copy_bytes, repeats)
        except Exception as e:  # e.g. out of memory: fall back to the datasheet, say so
            dm.notes.append(f"copy bandwidth not measured: {type(e).__name__}: {e}")
    return dm
