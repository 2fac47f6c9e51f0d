"""Output-directory handling shared by the embedded dataset writers.

Every dataset writes ``dataset_info.json`` last, so its presence marks a complete dataset. Files hold
only paths relative to the dataset root, so the same seed gives the same annotation bytes wherever it is
written (videos: see :mod:`cmgen.data.video_io` for what is promised).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cmgen.errors import DataError, DataNotFoundError

__all__ = ["INFO_FILE", "FORMAT_VERSION", "GENERATE_MODES", "prepare_out_dir", "write_json", "write_text",
           "ensure_dataset", "embedded_data_dir", "writer_config", "prepare_embedded_data"]

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


def read_info(root: Path) -> Optional[dict[str, Any]]:
    """``root/dataset_info.json`` when it is one cmgen wrote (names an embedded dataset), else None."""
    try:
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(info, dict) and info.get("dataset") in OWNED_ENTRIES and isinstance(info.get("config"), dict):
        return info
    return None


def config_differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(set(found) | set(wanted))
    return ", ".join(f"{k}: {found.get(k, '-')!r} there, {wanted.get(k, '-')!r} asked" for k in keys
                     if found.get(k) != wanted.get(k))


def prepare_out_dir(out_dir: str | os.PathLike, dataset: str, config: dict[str, Any], overwrite: bool) -> Path:
    """Create ``out_dir`` or make it safe to (re)write ``dataset`` with ``config`` there.

    An empty or missing directory is used as is. A directory holding the same dataset written with the
    same config (a rerun, which reproduces the same files) is rewritten. Another cmgen dataset or config
    (a ``dataset_info.json`` cmgen wrote) raises ``FileExistsError`` unless ``overwrite``, which removes
    the entries the embedded writers own. A directory cmgen did not write is never emptied: if it holds
    an entry a writer owns (``ucf101/``, ``annotations/``, ...) it is refused even with ``overwrite``;
    otherwise ``overwrite`` writes next to its files.
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
    owned = {name for names in OWNED_ENTRIES.values() for name in names}
    listing = f"{', '.join(existing[:5])}{', ...' if len(existing) > 5 else ''}"
    info = read_info(root)
    if info is None:
        clash = [name for name in existing if name in owned]
        if clash:
            raise FileExistsError(
                f"{root} holds {', '.join(clash)} but was not written by cmgen (no {INFO_FILE} of its own), so it "
                f"is left alone; write {dataset} to an empty or new directory")
        if not overwrite:
            raise FileExistsError(f"{root} is not empty ({listing}) and was not written by cmgen; "
                                  f"write {dataset} to an empty or new directory")
        return root
    same = (info.get("dataset") == dataset and info.get("config") == config
            and info.get("format_version") == FORMAT_VERSION)
    if not (same or overwrite):
        what = (f"{info['dataset']} format {info.get('format_version')}" if info["dataset"] != dataset
                else f"{dataset} format {info.get('format_version')} with other settings "
                     f"({config_differences(info['config'], config) or 'format ' + str(FORMAT_VERSION) + ' asked'})")
        raise FileExistsError(f"{root} holds {what}, written by cmgen; pass overwrite=True (--overwrite) to "
                              f"replace it")
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

    Methods use it to write their embedded dataset on first use; ``marker`` is the file whose presence means
    the data is complete (``dataset_info.json``, which the writers write last; ``"."``, the root itself, only
    for data written in one step). Two independent runs that need the same data at once (two configs
    launched together into one ``runs/`` folder) do not race: the check and the write hold an exclusive
    lock on ``.<root name>.lock`` beside ``root``, so the second waits for the first's data and writes
    nothing. Returns ``root`` as a Path.
    """
    from cmgen.distributed import barrier, rank  # torch: only for the methods, not for `cmgen data`

    root = Path(root)
    if rank() == 0 and not (root / marker).exists():
        with _exclusive_lock(root.parent / f".{root.name}.lock"):
            if not (root / marker).exists():      # not written by another process while this one waited
                write()
    barrier()
    return root


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """``fcntl.flock(LOCK_EX)`` on ``path`` (created, parents too) for the ``with`` block; no lock where
    ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:               # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------------------------------
# embedded data used by the methods: one location, explicit generation
# ----------------------------------------------------------------------------------------------------
GENERATE_MODES = ("auto", "always", "never")
DATA_ENV = "CMGEN_DATA"


def _writer(dataset: str) -> Callable[..., dict[str, Any]]:
    if dataset == "shapes":
        from .shapes import write_shapes
        return write_shapes
    if dataset == "moving-digits":
        from .moving_digits import write_moving_digits
        return write_moving_digits
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(OWNED_ENTRIES)}")


def writer_config(dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``config`` the writer of ``dataset`` records in ``dataset_info.json`` for keyword ``settings``
    (its defaults filled in; a setting the writer lists in its ``config_omits_default`` attribute, added
    after data was already written, is left out at its default, as the writer leaves it out); a keyword
    the writer does not take raises ``ValueError``."""
    writer = _writer(dataset)
    params = inspect.signature(writer).parameters
    names = [n for n in params if n not in ("out_dir", "overwrite", "progress")]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"{dataset} writer takes no setting {unknown}; it takes {names}")
    omit = getattr(writer, "config_omits_default", ())
    return {n: settings.get(n, params[n].default) for n in names
            if not (n in omit and settings.get(n, params[n].default) == params[n].default)}


def embedded_data_dir(dataset: str, settings: dict[str, Any]) -> Path:
    """Where the methods keep the embedded data: ``$CMGEN_DATA/<dataset>-<digest>``.

    ``$CMGEN_DATA`` defaults to ``data`` under the current directory; ``<digest>`` is the first 10 hex
    digits of the SHA-256 of the writer's full config (:func:`writer_config`), so data written with other
    settings is never reused: each setting has its own folder, described by its ``dataset_info.json``.
    """
    config = writer_config(dataset, settings)
    digest = hashlib.sha256(json.dumps([dataset, config], sort_keys=True).encode()).hexdigest()[:10]
    return Path(os.environ.get(DATA_ENV) or "data") / f"{dataset}-{digest}"


def _write_atomically(root: Path, dataset: str, config: dict[str, Any]) -> None:
    """Write into a sibling folder, then rename it to ``root``: a crash leaves no half dataset, and of
    two processes that write at once one wins and the other drops its copy."""
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    _writer(dataset)(tmp, **config, progress=False)
    if root.exists():                 # stale (an older format): it is cmgen's, checked by the caller
        shutil.rmtree(root)
    try:
        os.rename(tmp, root)
    except OSError:                   # another process renamed its copy first
        if read_info(root) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_embedded_data(root: Optional[str | os.PathLike], dataset: str, settings: dict[str, Any],
                          generate: str = "auto", required: Sequence[str] = (), key: str = "data") -> Path:
    """Resolve a method's data root, writing cmgen's embedded ``dataset`` where the config asks for it.

    Args:
        root: ``<key>.root`` from the config; None (or "") means the embedded data's one location,
            :func:`embedded_data_dir` of ``settings``.
        dataset: ``"shapes"`` or ``"moving-digits"``.
        settings: keyword arguments of the writer (``write_shapes`` / ``write_moving_digits``).
        generate: ``<key>.generate``. ``"auto"``: write the embedded data only at its default location
            (when missing or written by an older cmgen); a root the user gave must hold the data.
            ``"always"``: (re)write it at ``root`` (never into a folder cmgen did not write, see
            :func:`prepare_out_dir`). ``"never"``: only check.
        required: paths under the root the method's loader needs; the first missing one is named in the
            error.
        key: config section, for messages.

    Returns:
        The data root. Rank 0 writes, every process waits for it (like :func:`ensure_dataset`).

    Raises:
        DataNotFoundError: a required file is missing (a mistyped path is never replaced by synthetic data).
        DataError: bad ``generate``, or default-location data from another cmgen format with ``never``.

    A user-given root holding cmgen data written with other settings than ``settings`` is used as is and
    the difference is printed (``cmgen: note: ...``) on rank 0.
    """
    from cmgen.distributed import barrier, rank  # torch: only for the methods, not for `cmgen data`

    if generate not in GENERATE_MODES:
        raise DataError(f"{key}.generate must be one of {list(GENERATE_MODES)}, got {generate!r}")
    config = writer_config(dataset, settings)
    default = root is None or str(root) == ""
    target = embedded_data_dir(dataset, config) if default else Path(root)
    where = f"the embedded {dataset} data at {target}" if default else f"{key}.root={target}"

    def up_to_date() -> bool:
        info = read_info(target)
        return (info is not None and info["dataset"] == dataset and info["config"] == config
                and info.get("format_version") == FORMAT_VERSION)

    failure: Optional[BaseException] = None
    if rank() == 0:
        try:
            if default and generate != "never" and not (generate == "auto" and up_to_date()):
                if target.exists() and any(target.iterdir()) and read_info(target) is None:
                    raise DataError(f"{where} exists but holds no {INFO_FILE} written by cmgen (an interrupted "
                                    f"write, or someone else's files); remove that folder or set {key}.root")
                _write_atomically(target, dataset, config)
            elif generate == "always":
                _writer(dataset)(target, **config, overwrite=True, progress=False)
        except (OSError, ValueError) as err:  # let the other ranks leave the barrier, then fail
            failure = err
    barrier()
    if failure is not None:
        raise failure

    info = read_info(target)
    if info is not None and info["dataset"] != dataset:
        raise DataError(f"{where} holds cmgen's {info['dataset']} data, not {dataset}")
    if default and generate == "never" and not up_to_date():
        state = "is missing" if info is None else f"was written in format {info.get('format_version')}"
        raise DataNotFoundError(f"{where} {state} and {key}.generate=never; write it with {key}.generate=auto "
                                f"(or `cmgen data {dataset} --out {target}` with the config's settings)")
    missing = [r for r in (INFO_FILE,) * default + tuple(required) if not (target / r).exists()]
    if missing:
        hint = ""
        if not default:
            empty = not target.exists() or (target.is_dir() and not any(target.iterdir()))
            hint = (f"; {key}.generate=auto writes cmgen's embedded data only at its default location "
                    f"(leave {key}.root unset)" + (f", {key}.generate=always writes it here" if empty else ""))
        raise DataNotFoundError(f"{where}: {target / missing[0]} not found (the loader reads "
                                f"{', '.join(required) or INFO_FILE} under the root){hint}")
    if not default and info is not None and info["config"] != config and rank() == 0:
        print(f"cmgen: note: {where} holds {dataset} written with other settings than the config's "
              f"{key}.* ({config_differences(info['config'], config)}); using the data found", file=sys.stderr)
    return target
