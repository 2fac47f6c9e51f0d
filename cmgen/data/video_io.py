"""Deterministic H.264 mp4 writing with PyAV.

The embedded datasets promise "same seed -> same bytes", so the encoder is pinned: libx264 in a single
thread (x264's multi-threaded frame and slice decisions depend on scheduling), fixed CRF and preset, and
the muxer's ``+bitexact`` flag, which drops the libavformat version string from the file header.
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

__all__ = ["h264_encoder", "write_mp4"]

# Preference order; libx264 ships in PyAV's wheels. The fallbacks are software encoders that exist in
# some FFmpeg builds; hardware encoders are left out because their output depends on the device.
_H264_ENCODERS = ("libx264", "libopenh264")


def h264_encoder() -> str:
    """Name of the H.264 encoder used by :func:`write_mp4` (``"libx264"`` with PyAV's wheels)."""
    for name in _H264_ENCODERS:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"no software H.264 encoder in this PyAV build; looked for {list(_H264_ENCODERS)}")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Encode RGB frames as an H.264 (yuv420p) mp4, byte-for-byte reproducibly.

    Args:
        path: output ``.mp4`` file.
        frames: ``(T, H, W, 3)`` uint8 RGB; H and W must be even (yuv420p subsamples chroma by 2).
        fps: frame rate written into the container (frame ``t`` has pts ``t / fps``).
        crf: x264 constant rate factor (0 = lossless luma, 18 = visually lossless, 51 = worst).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"need T >= 1 and even H, W for yuv420p, got T={t}, H={h}, W={w}")
    if not (isinstance(fps, int) and fps > 0):
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    encoder = h264_encoder()
    options = {"crf": str(crf), "preset": "medium", "threads": "1"} if encoder == "libx264" else {}
    with av.open(os.fspath(path), "w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps), options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())  # flush the frames x264 holds back for B-frame decisions
