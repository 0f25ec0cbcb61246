"""Peak-memory measurement of the GRPO phases ("sampling" and "update").

`PeakMemory` is a context manager that measures the peak memory used by a block above the level at
entry:

    with PeakMemory(device) as pm:
        rollouts = sampler.sample(...)
    pm.peak_bytes            # peak during the block minus the baseline at entry
    pm.peak_allocated_bytes  # absolute peak during the block
    pm.baseline_bytes        # level at entry

- CUDA: `torch.cuda.reset_peak_memory_stats` at entry, `max_memory_allocated` at exit (tensors
  held by the caching allocator, the same figure the paper reports).
- CPU: process RSS (psutil), sampled by a daemon thread every ~2 ms plus once at entry and exit.
  Without psutil it falls back to `resource.getrusage().ru_maxrss`, a lifetime high-water mark, so
  a block that stays below an earlier peak reads as 0 (`pm.note` says so).

`PeakMemoryMonitor` is the Lightning callback: the GRPO module calls `on_phase_start` /
`on_phase_end(trainer, pl_module, phase)` on every callback that has them, and the monitor logs
`memory/peak_{phase}_gb` (bytes / 2**30).

Tests: `python -m pytest -q tests/test_memory_callback.py`.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Any

import lightning.pytorch as pl
import torch

from common.units import GB

try:  # psutil gives the current RSS; without it only the lifetime maximum is available
    import psutil
except ImportError:  # pragma: no cover - exercised only where psutil is absent
    psutil = None



def _maxrss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_malloc_tuned = False


def release_cpu_memory() -> None:
    """Make RSS track live CPU memory (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after a large free, so later big tensors come from the heap
    and stay resident after they die: RSS would then miss a phase's allocations. A fixed 1 MiB
    threshold keeps large tensors on mmap (returned to the OS when freed), and malloc_trim
    hands back free heap pages before a measurement starts.
    """
    global _malloc_tuned
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not _malloc_tuned:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
            _malloc_tuned = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Context manager: peak memory of a block above the baseline at entry, in bytes.

    Args:
        device: where to measure; a CUDA device uses the allocator statistics, anything else
            measures the process RSS.
        interval_s: CPU sampling period of the background thread.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.002) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_s = interval_s
        self.baseline_bytes: int = 0
        self.peak_allocated_bytes: int = 0
        self.peak_bytes: int = 0
        self.note: str = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._peak_rss: int = 0

    @property
    def backend(self) -> str:
        """Which measurement is used: "cuda", "rss" (psutil) or "maxrss" (getrusage fallback)."""
        if self.device.type == "cuda":
            return "cuda"
        return "rss" if psutil is not None else "maxrss"

    def __enter__(self) -> PeakMemory:
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.backend == "rss":
            release_cpu_memory()
            self._process = psutil.Process()
            self.baseline_bytes = self._rss()
            self._peak_rss = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="PeakMemory", daemon=True)
            self._thread.start()
        else:
            self.note = "psutil missing: ru_maxrss is a lifetime peak; blocks below it read as 0"
            self.baseline_bytes = _maxrss_bytes()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.backend == "rss":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self._peak_rss = max(self._peak_rss, self._rss())
            self.peak_allocated_bytes = self._peak_rss
        else:
            self.peak_allocated_bytes = _maxrss_bytes()
        self.peak_bytes = max(self.peak_allocated_bytes - self.baseline_bytes, 0)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _poll(self) -> None:
        # Event.wait releases the GIL between samples, so the measured code keeps running.
        while not self._stop.wait(self.interval_s):
            rss = self._rss()
            if rss > self._peak_rss:
                self._peak_rss = rss


class PeakMemoryMonitor(pl.Callback):
    """Logs `memory/peak_{phase}_gb` for every phase the GRPO module announces.

    The module calls `on_phase_start(trainer, pl_module, phase)` before a phase ("sampling",
    "update") and `on_phase_end(...)` after it; the value is the peak above the level at the
    start of that phase, in GiB (bytes / 2**30). `self.last` keeps the latest value per metric.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self._open: dict[str, PeakMemory] = {}

    def on_phase_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str
    ) -> None:
        if not phase:
            raise ValueError("phase must be a non-empty string such as 'sampling' or 'update'")
        stale = self._open.pop(phase, None)
        if stale is not None:  # a phase that never ended (e.g. an exception): stop its thread
            stale.__exit__(None, None, None)
        meter = PeakMemory(pl_module.device, interval_s=self.interval_s)
        self._open[phase] = meter.__enter__()

    def on_phase_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str
    ) -> None:
        meter = self._open.pop(phase, None)
        if meter is None:
            raise ValueError(f"phase {phase!r} ended without on_phase_start")
        meter.__exit__(None, None, None)
        name = f"memory/peak_{phase}_gb"
        value = meter.peak_bytes / GB
        self.last[name] = value
        pl_module.log(name, value, on_step=True, on_epoch=False)

    def _close_all(self) -> None:
        for meter in self._open.values():
            meter.__exit__(None, None, None)
        self._open.clear()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_all()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_all()
