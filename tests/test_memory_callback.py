"""Tests for `callbacks/memory.py`: PeakMemory on CPU (RSS thread) and the phase monitor's hooks.

Run: `python -m pytest -q tests/test_memory_callback.py`
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from common.units import GB
from callbacks.memory import PeakMemory, PeakMemoryMonitor
from tests.helpers import run_entry

MB = 1_000_000


def _hold_200mb(seconds: float = 0.05) -> None:
    block = torch.ones(50_000_000)  # 200 MB of float32, written so the pages are resident
    time.sleep(seconds)
    del block


def test_peak_memory_sees_a_transient_allocation_on_cpu() -> None:
    with PeakMemory("cpu") as pm:
        _hold_200mb()
    assert pm.backend == "rss"
    assert pm.peak_bytes >= 150 * MB
    assert pm.peak_allocated_bytes == pm.baseline_bytes + pm.peak_bytes


def test_peak_memory_is_relative_to_the_baseline_at_entry() -> None:
    held = torch.ones(50_000_000)  # 200 MB alive before entry belongs to the baseline
    with PeakMemory(torch.device("cpu")) as pm:
        small = torch.ones(1000)
        del small
    del held
    assert pm.baseline_bytes >= 150 * MB
    assert pm.peak_bytes < 100 * MB
    assert pm.peak_allocated_bytes >= pm.baseline_bytes


def test_peak_memory_thread_stops_and_default_device_is_cpu() -> None:
    pm = PeakMemory()
    with pm:
        thread = pm._thread
        assert thread is not None and thread.is_alive() and thread.daemon
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="interval_s"):
        PeakMemory("cpu", interval_s=0)


MAXRSS_SCRIPT = """
import os, callbacks.memory as memory, torch
memory.psutil = None
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
headroom = max(0, memory._maxrss_bytes() - rss)  # exec keeps the parent's high-water mark
with memory.PeakMemory("cpu") as above:   # 400 MB over the high-water mark: seen
    block = torch.ones((headroom + 400_000_000) // 4); del block
with memory.PeakMemory("cpu") as below:   # under the high-water mark: reads 0
    block = torch.ones(25_000_000); del block
print(above.backend, above.peak_bytes, below.peak_bytes, above.note)
"""


def test_peak_memory_without_psutil_falls_back_to_maxrss() -> None:
    """In another process (ru_maxrss is a lifetime peak, kept across exec): a block reaching
    400 MB above the high-water mark is measured as such, one below it reads 0 (the note)."""

    out = run_entry("-c", MAXRSS_SCRIPT, timeout=120, check=True)
    backend, above, below, note = out.stdout.strip().splitlines()[-1].split(maxsplit=3)
    assert backend == "maxrss" and "psutil" in note
    assert 350 * MB <= int(above) <= 450 * MB
    assert int(below) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_cuda() -> None:
    device = torch.device("cuda")
    with PeakMemory(device) as pm:
        block = torch.ones(50_000_000, device=device)
        del block
    assert pm.backend == "cuda"
    assert pm.peak_bytes >= 200 * MB
    assert pm.peak_allocated_bytes >= pm.peak_bytes


class FakeModule:
    """Stands in for the GRPO LightningModule: a device and a `log` that records its calls."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.calls: list[tuple[str, float, dict[str, Any]]] = []

    def log(self, name: str, value: float, **kwargs: Any) -> None:
        self.calls.append((name, value, kwargs))


def test_monitor_logs_both_phases() -> None:
    monitor, module = PeakMemoryMonitor(), FakeModule()
    monitor.on_phase_start(None, module, "sampling")
    _hold_200mb()
    monitor.on_phase_end(None, module, "sampling")
    monitor.on_phase_start(None, module, "update")
    monitor.on_phase_end(None, module, "update")

    names = [name for name, _, _ in module.calls]
    assert names == ["memory/peak_sampling_gb", "memory/peak_update_gb"]
    for _, value, kwargs in module.calls:
        assert kwargs == {"on_step": True, "on_epoch": False}
        assert isinstance(value, float) and value >= 0
    assert monitor.last["memory/peak_sampling_gb"] >= 150 * MB / GB
    assert monitor.last["memory/peak_update_gb"] == module.calls[1][1]


def test_monitor_rejects_end_without_start_and_cleans_up() -> None:
    monitor, module = PeakMemoryMonitor(), FakeModule()
    with pytest.raises(ValueError, match="phase"):
        monitor.on_phase_end(None, module, "update")
    monitor.on_phase_start(None, module, "sampling")
    meter = monitor._open["sampling"]
    monitor.on_exception(None, module, RuntimeError("boom"))
    assert not monitor._open and meter._thread is None
