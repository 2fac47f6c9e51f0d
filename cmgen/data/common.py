"""Output-directory handling shared by the embedded dataset writers.

Every dataset writes ``dataset_info.json`` last, so its presence marks a complete dataset. Files hold
only paths relative to the dataset root, so the same seed gives the same annotation bytes wherever it is
written (videos: see :mod:`cmgen.data.video_io` for what is promised).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["INFO_FILE", "FORMAT_VERSION", "prepare_out_dir", "write_json", "write_text", "ensure_dataset"]

INFO_FILE = "dataset_info.json"
# Bumped whenever a writer's output changes for the same arguments (2: moving-digits colour conversion in
# numpy and libx264 without assembly).
FORMAT_VERSION = 2

# Top-level entries each writer owns; --overwrite removes these and nothing else, so pointing --out at a
# directory holding other files never deletes them.
OWNED_ENTRIES = {
    "shapes": ("annotations", "train", "val", "imagefolder", "README.md", INFO_FILE),
    "moving-digits": ("ucf101", "msrvtt", "labels.json", "README.md", INFO_FILE),
}


def prepare_out_dir(out_dir: str | os.PathLike, dataset: str, config: dict[str, Any], overwrite: bool) -> Path:
    """Create ``out_dir`` or make it safe to (re)write ``dataset`` with ``config`` there.

    An empty or missing directory is used as is. A directory holding the same dataset written with the
    same config (a rerun, which reproduces the same bytes) is rewritten. Anything else raises
    ``FileExistsError`` unless ``overwrite``, which removes the entries the embedded writers own.
    """
    if dataset not in OWNED_ENTRIES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(OWNED_ENTRIES)}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--out {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in root.iterdir())
    if not existing:
        return root
    info_path = root / INFO_FILE
    same = False
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            same = (info.get("dataset") == dataset and info.get("config") == config
                    and info.get("format_version") == FORMAT_VERSION)
        except (json.JSONDecodeError, AttributeError):
            same = False
    if not (same or overwrite):
        raise FileExistsError(
            f"{root} is not empty ({', '.join(existing[:5])}{', ...' if len(existing) > 5 else ''}) and does not "
            f"hold {dataset} with the config {config}; pass overwrite=True (--overwrite) to replace it")
    owned = {name for names in OWNED_ENTRIES.values() for name in names}
    for name in existing:
        if name in owned:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return root


def write_json(path: Path, obj: Any) -> None:
    """Write JSON with sorted keys and a fixed layout, so reruns produce identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def ensure_dataset(root: str | os.PathLike, marker: str, write: Callable[[], Any]) -> Path:
    """Call ``write()`` on rank 0 when ``root / marker`` does not exist, then let every process wait for it.

    Methods use it to write their embedded dataset on first use; ``marker`` is the file (or ``"."`` for
    the root itself) whose presence means the data is there. Returns ``root`` as a Path.
    """
    from cmgen.distributed import barrier, rank  # torch: only for the methods, not for `cmgen data`

    root = Path(root)
    if rank() == 0 and not (root / marker).exists():
        write()
    barrier()
    return root
