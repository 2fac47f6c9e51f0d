"""cmgen.data.ensure_dataset: two processes that need the same data at once write it once, and neither
reads it before it is complete."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

from cmgen.data import ensure_dataset

MARKER = "dataset_info.json"


def _slow_write(root: Path, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "part.txt").write_text("first half")       # the folder exists long before it is complete
    time.sleep(1.0)
    (root / MARKER).write_text("{}")


def _worker(root: str, log: str, start: float, out) -> None:
    while time.time() < start:                          # both processes check at the same moment
        time.sleep(0.005)
    ensure_dataset(root, MARKER, lambda: _slow_write(Path(root), Path(log)))
    out.put(((Path(root) / MARKER).exists(), (Path(root) / "part.txt").exists()))


def test_concurrent_first_use_writes_once_and_waits(tmp_path):
    root, log = tmp_path / "data" / "shapes_32px", tmp_path / "writes.log"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3.0
    procs = [ctx.Process(target=_worker, args=(str(root), str(log), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [(True, True), (True, True)]      # neither returned before the marker was written
    assert len(log.read_text().split()) == 1            # one writer; the other waited on the lock


def test_existing_marker_skips_the_write(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / MARKER).write_text("{}")
    calls = []
    assert ensure_dataset(root, MARKER, lambda: calls.append(1)) == root
    assert calls == []
    ensure_dataset(tmp_path / "e", MARKER, lambda: calls.append(1))
    assert calls == [1]                                 # missing: written (this writer writes nothing)
