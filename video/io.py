"""Video decoding (decord, PyAV fallback) and clip samplers.

:func:`read_frames` decodes chosen frames of a video file to ``(T, H, W, 3)`` uint8. The default
backend is decord 0.6.0 (accurate ``get_batch`` seeking); PyAV is the fallback, picked with
``backend="av"`` or automatically when decord cannot open a file. Every failure raises
:class:`VideoReadError` naming the file, so datasets can skip and count bad videos.

Known decord 0.6.0 problems and what this module does about them:

- ``len(VideoReader)`` can over-report when the container has no frame count and decord estimates it
  from duration x fps (decord #373); ``get_batch`` past the real last frame then hangs *holding the
  GIL*, which no in-process timeout can interrupt. So indices are never handed to decord unchecked:
  when decord's length disagrees with the container's frame count (or the container has none), the
  frames are counted exactly by demuxing the stream with PyAV (packets only, no decoding) and the
  smaller count is used (:func:`num_frames`); out-of-range indices raise :class:`VideoReadError`.
- The decoder buffers ahead and its memory grows across batches (decord #157/#208): ``vr.seek(0)``
  after every batch releases it.
- ``timeout``: the read runs in a daemon thread and is abandoned after ``timeout`` seconds. That catches
  stalls that release the GIL (a hung network file system, a PyAV decode loop, decord's own I/O), not a
  hang inside C code that holds the GIL; against those, the index validation above is the prevention
  and ``DataLoader(num_workers > 0, timeout=...)`` is the cure, because a stuck worker *process* is
  detected by the main process.

Samplers are pure functions of the frame count returning ``LongTensor`` indices:
:func:`uniform_indices` (evenly over the whole video, CLIP4Clip-style), :func:`random_clip_indices`
(one random contiguous clip with a stride, training) and :func:`dense_clips` (``num_clips`` evenly
spaced clips, the 10-clip test protocol of VideoMoCo's UCF101/HMDB51 evaluation).
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["VideoReadError", "read_frames", "num_frames", "short_side_size", "uniform_indices",
           "random_clip_indices", "dense_clips", "BACKENDS"]

BACKENDS = ("decord", "av")


class VideoReadError(RuntimeError):
    """A video could not be decoded; ``path`` is the file and ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path!r}: {reason}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions; the default would call __init__ with the message only
        return type(self), (self.path, self.reason)


def _parse_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None`` (native), ``s`` (s x s) or ``(H, W)`` -> ``(H, W)``."""
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be None, a positive int or (H, W) of positive ints, got {size!r}")
    return size  # type: ignore[return-value]


def _as_indices(indices: Any) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 1-D sequence of ints, got shape {idx.shape} "
                         f"dtype {idx.dtype}")
    return idx.astype(np.int64)


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")


@functools.lru_cache(maxsize=4096)
def _av_probe(path: str, mtime_ns: int, size: int) -> tuple[int, int, int, int]:
    """(frame count in the container header (0 if absent), exact count of video packets, height, width).

    The packet count demuxes the file without decoding (milliseconds for a clip); cached per file
    version so a dataset pays it once per video and process."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            header = int(stream.frames or 0)
            height, width = int(stream.codec_context.height), int(stream.codec_context.width)
            packets = sum(1 for p in container.demux(stream) if p.size > 0)
    except (av.FFmpegError, IndexError, OSError) as e:
        raise VideoReadError(path, f"PyAV could not demux the video stream ({type(e).__name__}: {e})") from e
    return header, packets, height, width


def _probe(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return _av_probe(path, st.st_mtime_ns, st.st_size)


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(H, W)`` with the shorter side ``short_side`` and the aspect ratio kept (the other side rounded),
    the same rounding as ``video.videomoco.ClipAugment``'s short-side resize, so frames decoded at this
    size pass through that resize unchanged."""
    if height < 1 or width < 1 or short_side < 1:
        raise ValueError(f"need positive sizes, got height={height}, width={width}, short_side={short_side}")
    r = short_side / min(height, width)
    return max(1, round(height * r)), max(1, round(width * r))


def _verified_count(path: str, claimed: int) -> int:
    """Frame count safe to index: ``claimed`` when the container header agrees, else the demuxed
    packet count (clamped to ``claimed``, the frames the decoder believes it has)."""
    header, packets = _probe(path)[:2]
    if header == claimed and claimed > 0:
        return claimed
    return min(claimed, packets) if claimed > 0 else packets


def _check_indices(path: str, idx: np.ndarray, count: int) -> None:
    if count < 1:
        raise VideoReadError(path, "no decodable frames")
    bad = idx[(idx < 0) | (idx >= count)]
    if bad.size:
        raise VideoReadError(path, f"frame indices {bad[:8].tolist()} out of range for {count} frames")


def _open_decord(path: str, size: tuple[int, int] | None):
    import decord

    h, w = size if size is not None else (-1, -1)
    try:
        return decord.VideoReader(path, width=w, height=h, num_threads=1)
    except Exception as e:  # decord raises its own DECORDError (a RuntimeError) or plain RuntimeError
        raise VideoReadError(path, f"decord could not open the file ({type(e).__name__}: {e})") from e


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, *size, 3)`` uint8, antialiased bilinear."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _read_decord(path: str, idx: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    vr = _open_decord(path, size)
    _check_indices(path, idx, _verified_count(path, len(vr)))
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
        vr.seek(0)  # drop the decoder's read-ahead buffer (decord #157/#208)
    except Exception as e:
        if size is None or "DECORDArrayCopyFromTo" not in str(e):
            raise VideoReadError(path, f"decord failed to decode frames ({type(e).__name__}: {e})") from e
        # decord 0.6.0 mis-sizes its output buffer for some small scaled widths (e.g. 16, 24, 48, 72 px:
        # FFmpeg pads the RGB rows, decord copies assuming none); decode natively and resize here instead
        return _resize(_read_decord(path, idx, None), size)
    return frames


def _read_av(path: str, idx: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Decode sequentially from the start up to ``max(idx)``: exact frame numbering without relying on
    timestamps, at the cost of decoding the prefix (fine for clips; decord is the fast path)."""
    import av

    _check_indices(path, idx, _probe(path)[1])
    wanted = set(idx.tolist())
    last = int(idx.max())
    kwargs: dict[str, Any] = {"format": "rgb24"}
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = frame.to_ndarray(**kwargs)
                if i >= last:
                    break
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(path, f"PyAV failed to decode ({type(e).__name__}: {e})") from e
    missing = sorted(wanted - got.keys())
    if missing:
        raise VideoReadError(path, f"PyAV decoded only {len(got)} of the requested frames; missing {missing[:8]}")
    return np.stack([got[i] for i in idx.tolist()])


def _read(path: str, idx: np.ndarray, size: tuple[int, int] | None, backend: str,
          short_side: int | None = None) -> np.ndarray:
    if short_side is not None:
        size = short_side_size(*_probe(path)[2:], short_side)
    if backend == "av":
        return _read_av(path, idx, size)
    if backend == "decord":
        try:
            vr_frames = _read_decord(path, idx, size)
        except VideoReadError as e:
            if not e.reason.startswith("decord could not open"):
                raise
            # decord's bundled FFmpeg misses some containers/codecs that PyAV's handles
            try:
                return _read_av(path, idx, size)
            except VideoReadError as e2:
                raise VideoReadError(path, f"{e.reason}; fallback: {e2.reason}") from e2
        return vr_frames
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def read_frames(path: str | os.PathLike, indices: Sequence[int] | np.ndarray | torch.Tensor, *,
                size: int | Sequence[int] | None = None, short_side: int | None = None,
                timeout: float | None = 30.0, backend: str = "decord") -> torch.Tensor:
    """Decode frames ``indices`` of the video at ``path``.

    Args:
        path: video file (anything FFmpeg reads: mp4, avi, mkv, webm ...).
        indices: ``(T,)`` frame numbers in presentation order, 0-based, repeats allowed.
        size: ``None`` for the native resolution, ``s`` for s x s, or ``(H, W)``; FFmpeg's scaler
            resizes while decoding (aspect ratio is not kept), except for the small widths where decord
            0.6.0 fails to scale, which are decoded natively and resized with antialiased bilinear.
        short_side: instead of ``size``, scale while decoding so that the shorter side is ``short_side``
            and the aspect ratio is kept (:func:`short_side_size` of the stream's coded size). Training
            pipelines that crop from a short-side resize decode 10-30x fewer pixels of HD videos this way
            and never hold the native frames (FFmpeg's bicubic scaler, not antialiased bilinear).
        timeout: seconds before the read is abandoned with :class:`VideoReadError` (``None``: no limit);
            see the module docstring for what it can and cannot stop.
        backend: ``"decord"`` (falls back to PyAV when decord cannot open the file) or ``"av"``.

    Returns:
        ``(T, H, W, 3)`` uint8 RGB tensor.

    Raises:
        VideoReadError: missing/corrupt file, indices outside ``[0, num_frames(path))``, decode failure
            or timeout; the message names the file.
    """
    path = os.fspath(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")
    idx = _as_indices(indices)
    hw = _parse_size(size)
    if short_side is not None and (hw is not None or int(short_side) < 1):
        raise ValueError(f"short_side must be a positive int and excludes size; got short_side={short_side!r}, "
                         f"size={size!r}")
    short = None if short_side is None else int(short_side)
    _check_file(path)
    if timeout is None:
        return torch.from_numpy(_read(path, idx, hw, backend, short))

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["frames"] = _read(path, idx, hw, backend, short)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, name=f"read_frames:{os.path.basename(path)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise VideoReadError(path, f"read did not finish within {timeout} s (abandoned)")
    if "error" in result:
        raise result["error"]
    return torch.from_numpy(result["frames"])


def num_frames(path: str | os.PathLike, backend: str = "decord") -> int:
    """Number of frames of ``path`` that :func:`read_frames` can index.

    With ``"decord"``, decord's ``len`` checked against the container header, and against an exact
    demuxed packet count when they disagree (decord #373). With ``"av"``, the demuxed packet count.
    Raises :class:`VideoReadError` when the file cannot be opened by either library.
    """
    path = os.fspath(path)
    _check_file(path)
    if backend == "decord":
        try:
            return _verified_count(path, len(_open_decord(path, None)))
        except VideoReadError as e:
            if not e.reason.startswith("decord could not open"):
                raise
    elif backend != "av":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    count = _probe(path)[1]
    if count < 1:
        raise VideoReadError(path, "no video frames")
    return count


def _check_counts(num_frames: int, clip_len: int, stride: int = 1) -> None:
    if num_frames < 1 or clip_len < 1 or stride < 1:
        raise ValueError(f"need num_frames >= 1, clip_len >= 1, stride >= 1; got num_frames={num_frames}, "
                         f"clip_len={clip_len}, stride={stride}")


def uniform_indices(num_frames: int, clip_len: int) -> torch.Tensor:
    """``(clip_len,)`` indices spread evenly over the whole video: the centre of each of ``clip_len``
    equal segments, ``floor((i + 0.5) * num_frames / clip_len)``; repeats frames when the video is
    shorter than ``clip_len``."""
    _check_counts(num_frames, clip_len)
    i = torch.arange(clip_len, dtype=torch.float64)
    return torch.floor((i + 0.5) * num_frames / clip_len).long().clamp_(max=num_frames - 1)


def random_clip_indices(num_frames: int, clip_len: int, stride: int = 1,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``(clip_len,)`` indices ``start + stride * arange(clip_len)`` with ``start`` uniform over every
    position where the clip fits; a video shorter than the clip span starts at 0 and repeats its last
    frame. ``generator=None`` uses torch's global RNG (seeded per DataLoader worker)."""
    _check_counts(num_frames, clip_len, stride)
    span = (clip_len - 1) * stride + 1
    high = max(num_frames - span, 0) + 1
    start = int(torch.randint(high, (1,), generator=generator))
    return (start + stride * torch.arange(clip_len)).clamp_(max=num_frames - 1)


def dense_clips(num_frames: int, clip_len: int, num_clips: int = 10, stride: int = 1) -> torch.Tensor:
    """``(num_clips, clip_len)`` indices of ``num_clips`` clips whose starts are evenly spaced from the
    first to the last position where a clip fits (rounded), for test-time averaging over clips.
    Short videos give clips starting at 0 with the last frame repeated."""
    _check_counts(num_frames, clip_len, stride)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    span = (clip_len - 1) * stride + 1
    last_start = max(num_frames - span, 0)
    if num_clips == 1:
        starts = torch.tensor([last_start // 2])
    else:
        starts = torch.round(torch.linspace(0, last_start, num_clips, dtype=torch.float64)).long()
    return (starts[:, None] + stride * torch.arange(clip_len)[None, :]).clamp_(max=num_frames - 1)
