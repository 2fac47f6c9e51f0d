"""Measurement helpers shared by the benchmarks in ``bench/``.

Every configuration of a benchmark runs in a fresh worker process so that one configuration's allocator
state, thread pools and page cache cannot leak into the next one's time or memory. The driver launches
the worker with :func:`run_worker` and reads back one JSON line; the worker measures with
:class:`PeakMemory` and :func:`time_repeated`.

Memory is the process's resident set as the kernel counts it (``VmRSS``/``VmHWM`` in
``/proc/self/status``), so it includes everything a real training step pays for: the tensors, the
allocator's slack and the BLAS work buffers. On CUDA it is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

KIB = 1024
MIB = 1024**2
GIB = 1024**3


def _status_kib(field: str, pid: int | str = "self") -> int:
    """One ``kB`` field of ``/proc/PID/status`` (e.g. ``VmRSS``), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"field {field!r} not found in /proc/{pid}/status")
    return int(match.group(1))


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process, in bytes."""
    return _status_kib("VmRSS", pid) * KIB


def mem_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``: what can be allocated without swapping or OOM."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KIB
    raise ValueError("MemAvailable not found in /proc/meminfo")


class PeakMemory:
    """Extra peak memory of a region of code, relative to the memory in use when it starts.

    CPU: resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM``
    afterwards, so transient peaks between samples are not missed. Kernels that refuse the reset get
    a 1 ms sampling thread instead (it can miss very short peaks; ``method`` says which was used).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    Usage::

        with PeakMemory(device) as peak:
            step()
        peak.extra_bytes
    """

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.baseline_bytes = 0
        self.extra_bytes = 0
        self.method = ""
        self._sampled_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        self.baseline_bytes = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
            self._sampled_peak = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_peak, rss_bytes())
        else:
            peak = _status_kib("VmHWM") * KIB
        self.extra_bytes = max(0, peak - self.baseline_bytes)


def time_repeated(
    fn: Callable[[], object],
    repeat: int,
    budget_s: float,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds taken by successive calls of ``fn``: at least one, at most ``repeat``, and no new call
    once ``budget_s`` seconds of wall time have been spent.

    Returns ``{"wall": [...], "cpu": [...]}``: wall-clock time, and the CPU time of the whole process
    (all threads). On a machine shared with other jobs the wall time stretches with the load while the
    CPU time mostly does not, so the pair tells contention apart from real cost. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read so asynchronous devices are timed to
    completion.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if budget_s <= 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < repeat and (not wall or time.perf_counter() - start < budget_s):
        if sync is not None:
            sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if sync is not None:
            sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def summarize_times(times: dict[str, list[float]]) -> dict:
    """Median, min and max wall time, median CPU time (seconds), and the number of calls."""
    wall, cpu = times["wall"], times["cpu"]
    if not wall or len(wall) != len(cpu):
        raise ValueError(f"need matching non-empty wall and cpu timings, got {len(wall)} and {len(cpu)}")
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": statistics.median(cpu),
        "reps": len(wall),
    }


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None) -> dict:
    """What a reader needs to put a timing in context: CPU, cores, memory, library versions, date."""
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": round(_meminfo_total() / GIB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if threads is not None:
        info["threads"] = threads
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KIB
    raise ValueError("MemTotal not found in /proc/meminfo")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_worker(
    argv: Sequence[str],
    timeout_s: float,
    max_rss_bytes: int | None = None,
    threads: int | None = None,
) -> dict:
    """Run ``python argv...`` in a fresh process and return the JSON object on its last stdout line.

    The child is killed (and ``{"status": "killed", ...}`` returned) when it runs past ``timeout_s`` or
    when its resident memory exceeds ``max_rss_bytes``: on a shared machine without swap, an
    over-budget configuration must not push the kernel's OOM killer onto someone else's process.
    ``threads`` pins the OpenMP/MKL pools through the environment as well, so they are sized before
    torch starts them. A child that exits non-zero gives ``{"status": "error", "stderr": ...}``.
    """
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [
        threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    start = time.monotonic()
    reason = None
    max_seen = 0
    while proc.poll() is None:
        if time.monotonic() - start > timeout_s:
            reason = f"timeout after {timeout_s:.0f} s"
        elif max_rss_bytes is not None:
            try:
                max_seen = max(max_seen, rss_bytes(proc.pid))
            except (OSError, ValueError):
                pass  # the child exited between poll() and the read
            if max_seen > max_rss_bytes:
                reason = f"RSS {max_seen / GIB:.1f} GiB > limit {max_rss_bytes / GIB:.1f} GiB"
        if reason is not None:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.05)
    for r in readers:
        r.join()
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    wall = time.monotonic() - start
    if reason is not None:
        return {"status": "killed", "reason": reason, "wall_s": wall}
    if proc.returncode != 0:
        return {"status": "error", "returncode": proc.returncode, "stderr": stderr[-4000:], "wall_s": wall}
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            result = json.loads(line)
            result.setdefault("status", "ok")
            result["wall_s"] = wall
            return result
    return {"status": "error", "returncode": 0, "stderr": "no JSON line on stdout: " + stdout[-2000:], "wall_s": wall}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` has one of 'l'/'r' per column (default: all left)."""
    if align is not None and len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
    sep = ["---:" if (align and align[i] == "r") else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
