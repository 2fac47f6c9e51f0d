"""Reproducible H.264 mp4 writing with PyAV.

What "same seed -> same bytes" rests on, and where it stops (measured, see tests/test_data.py):

- **Colour conversion in numpy.** RGB -> yuv420p is done here with exact integer BT.601 arithmetic
  (:func:`rgb_to_yuv420p`) instead of libswscale, whose SIMD paths are chosen by CPU features and are not
  promised to round like its C code.
- **libx264 without assembly** (``x264-params asm=0``). With x264's SIMD enabled, the same frames gave
  different bitstreams from one write to the next in one process (PyAV 18.1 / x264 core 165 on an
  AVX-512 Xeon: 6 of 24 clips of the test dataset), depending on what the heap held before: an
  assembly routine of the macroblock-tree rate control reads memory that was never written (the
  variation disappears with ``asm=0``, with ``mbtree=0`` or with ``bframes=0``). The decoded frames were
  the same, the bytes not. Without assembly x264 runs its C code, which is the same on every CPU of one
  architecture; for 64 px clips it costs about 1.7x the encode time.
- **One thread** (``threads=1``, so no sliced or lookahead threads: x264's threaded decisions depend on
  scheduling), fixed CRF and preset, and the muxer's ``+bitexact`` flag (no libavformat version string).

What is promised: the same seed gives the same decoded frames and the same annotation files everywhere,
and the same mp4 bytes for the same PyAV build on the same architecture. Across PyAV/x264 versions
(the x264 version string is part of the file) or architectures (x86-64 vs ARM compile x264's floating
point differently) the bytes may differ while the frames agree up to the lossy coding.
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

__all__ = ["h264_encoder", "rgb_to_yuv420p", "write_mp4"]

# Preference order; libx264 ships in PyAV's wheels. The fallbacks are software encoders that exist in
# some FFmpeg builds; hardware encoders are left out because their output depends on the device.
_H264_ENCODERS = ("libx264", "libopenh264")
# x264 options behind the reproducibility promise above (x264's own `--asm 0`, `--threads 1`, ...)
X264_PARAMS = "asm=0:threads=1:lookahead-threads=1:sliced-threads=0"


def h264_encoder() -> str:
    """Name of the H.264 encoder used by :func:`write_mp4` (``"libx264"`` with PyAV's wheels)."""
    for name in _H264_ENCODERS:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"no software H.264 encoder in this PyAV build; looked for {list(_H264_ENCODERS)}")


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(3H/2, W)`` uint8 planar yuv420p (the layout of PyAV's ``from_ndarray``).

    BT.601 limited range in 8-bit fixed point, the integer form of ITU-R BT.601 used by FFmpeg's C
    reference (Y = 16 + (66 R + 129 G + 25 B + 128) >> 8, Cb = 128 + (-38 R - 74 G + 112 B + 128) >> 8,
    Cr = 128 + (112 R - 94 G - 18 B + 128) >> 8); chroma is the rounded mean of each 2x2 block of the
    full-resolution Cb/Cr (centre siting). Gray input (R = G = B) gives Cb = Cr = 128 exactly.
    """
    rgb = frame.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + ((66 * r + 129 * g + 25 * b + 128) >> 8)
    cb = 128 + ((-38 * r - 74 * g + 112 * b + 128) >> 8)
    cr = 128 + ((112 * r - 94 * g - 18 * b + 128) >> 8)
    h, w = y.shape

    def pool(c: np.ndarray) -> np.ndarray:
        return (c.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) + 2) >> 2

    planes = [y.ravel(), pool(cb).ravel(), pool(cr).ravel()]
    return np.concatenate(planes).astype(np.uint8).reshape(h * 3 // 2, w)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Encode RGB frames as an H.264 (yuv420p) mp4, reproducibly (what that covers: module docstring).

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
    options = ({"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": X264_PARAMS}
               if encoder == "libx264" else {})
    with av.open(os.fspath(path), "w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps), options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(frames):
            # already in the stream's format and size, so PyAV hands it to the encoder unconverted
            video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())  # flush the frames x264 holds back for B-frame decisions
