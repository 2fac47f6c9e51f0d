"""Text-video retrieval metrics as the benchmarks report them: R@1/5/10, median and mean rank.

Conventions (CLIP4Clip ``metrics.py``, collaborative-experts ``model/metric.py``):

- ``sim`` is (num_texts, num_videos); rows are captions, columns videos. Caption t describes video
  ``text_to_video[t]`` (``None``: square matrix, caption i <-> video i, the MSR-VTT 1k-A setting).
- t2v: every caption is a query ranked against all videos; its rank is the 1-based position of its video.
- v2t ``"best"`` (collaborative-experts): a video is a query ranked against ALL captions; its rank is the
  position of its best-ranked correct caption.
- v2t ``"maxpool"`` (CLIP4Clip ``tensor_video_to_text_sim``): each video's captions are first max-pooled
  into one score per (video u, video v) pair, S[u, v] = max_{t: text_to_video[t] = u} sim[t, v]; a video v
  is then ranked against the V caption groups by S[:, v], the correct group being its own.
- R@K in percent, ranks 1-based, MdR the median rank (``np.median``: the mean of the two middle ranks for
  an even count, as CLIP4Clip's ``np.median(ind) + 1``), MnR the mean rank.

Ties. With g items strictly above the correct score s*, e items equal to s* (the correct one included)
and c of those e correct (c = 1 except for v2t "best" with several captions scoring exactly s*):

- ``"optimistic"``: rank = g + 1 (every tie broken in favour of the correct item).
- ``"pessimistic"``: rank = g + e - c + 1 (every tie broken against it).
- ``"average"`` (default): everything is the expectation under a uniformly random order of the tied
  items. The rank of the first correct item among e tied with c correct is g + (e + 1) / (c + 1)
  (g + (e + 1)/2 for one correct item: the mean of the tied positions); R@K is the EXPECTED R@K,
  100 * mean over queries of P(rank <= K) with P = 1 - C(e - m, c) / C(e, c), m = clip(K - g, 0, e);
  MnR is the expected mean rank; MdR is the median of the per-query expected ranks (it may be a
  half-integer). Counting "fractional rank <= K" instead would make R@K a step function of the tie
  size (a constant N x N matrix would score R@1 = 0 and R@K = 100 as soon as K >= (N + 1)/2); the
  expectation gives exactly chance level, K/N, there.

CLIP4Clip's ``compute_metrics`` (``np.where(np.sort(-x) - diag(-x) == 0)``) instead emits one entry per
tied position, so a query tied with e items is counted e times, once at each tied rank. Without ties the
two agree exactly; with ties they differ (their result weights tied queries by e). On a constant matrix
they happen to agree (every query has the same e). CLIP4Clip's multi-sentence t2v
(``tensor_text_to_video_metrics``) breaks ties by ``argsort`` order and takes ``torch.median``, the LOWER
of the two middle ranks for an even number of captions; we use ``np.median`` throughout, as its
``compute_metrics`` does.

From embeddings (``retrieval_metrics_from_embeddings``). A 100k x 100k float32 matrix is 40 GB, so at
scale the scores are computed block by block from the embeddings and only per-query counts (g, e, c)
are kept: t2v ranks ``text_emb[rows] @ video_emb.T`` row blocks, v2t ranks ``video_emb[rows] @
text_emb.T`` row blocks (for "maxpool" each block is first max-pooled over every video's captions).
Each query's correct score is read from the same block it is compared with, so an item always ties
with itself and the rule above applies unchanged; peak extra memory is O(chunk_size * (T + V)).
The two directions compute their own products, so on real-valued data the t2v and v2t passes may see
scores that differ from one ``text_emb @ video_emb.T`` in the last bit (as any two BLAS calls may);
exactly representable data (small integers) gives identical numbers.

``dual_softmax`` and ``querybank_normalize`` rescore a similarity matrix using OTHER queries' scores
(the whole test query set, or a query bank). They are transductive / use extra data at test time, so
numbers after them must be reported apart from the plain ones.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.special import gammaln

__all__ = ["retrieval_metrics", "retrieval_metrics_from_embeddings", "dual_softmax", "querybank_normalize", "RECALL_KS", "TIES", "V2T_MODES"]

RECALL_KS = (1, 5, 10)
# counts of items above / tied with the correct score; int32 halves the temporary that summing a
# (chunk, num_videos) bool mask allocates compared with torch's default int64 (counts stay < 2**31)
_COUNT = torch.int32
TIES = ("average", "optimistic", "pessimistic")
V2T_MODES = ("best", "maxpool")


# ----------------------------------------------------------------------------------------------- input

def _check_sim(sim: Any, name: str = "sim") -> np.ndarray | torch.Tensor:
    """Keep numpy arrays as numpy (so huge or memory-mapped matrices are converted one chunk at a time)."""
    if not isinstance(sim, (np.ndarray, torch.Tensor)):
        sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_texts, num_videos), got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(sim.shape)}")
    if isinstance(sim, np.ndarray):
        if not (np.issubdtype(sim.dtype, np.floating) or np.issubdtype(sim.dtype, np.integer)):
            raise ValueError(f"{name} must hold real numbers, got dtype {sim.dtype}")
    elif sim.dtype.is_complex or sim.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {sim.dtype}")
    return sim


def _block(sim: np.ndarray | torch.Tensor, rows: slice, cols: slice = slice(None)) -> torch.Tensor:
    """sim[rows, cols] as a tensor; numpy chunks are copied only when they are read-only or strided."""
    part = sim[rows, cols]
    if isinstance(part, torch.Tensor):
        return part
    if not part.flags.writeable or not part.flags.c_contiguous:
        part = np.array(part, order="C")
    return torch.from_numpy(part)


def _check_nan(sim: np.ndarray | torch.Tensor, chunk: int, name: str = "sim") -> None:
    if isinstance(sim, np.ndarray) and not np.issubdtype(sim.dtype, np.floating):
        return
    if isinstance(sim, torch.Tensor) and not sim.dtype.is_floating_point:
        return
    count, first = 0, None
    for start in range(0, sim.shape[0], chunk):
        nan = torch.isnan(_block(sim, slice(start, start + chunk)))
        n = int(nan.sum()) if bool(nan.any()) else 0
        if n and first is None:
            r, c = (int(i) for i in nan.nonzero()[0])
            first = (start + r, c)
        count += n
    if count:
        raise ValueError(f"{name} contains {count} NaN value(s) (of {sim.shape[0] * sim.shape[1]}); "
                         f"the first is at (row {first[0]}, column {first[1]})")


def _check_text_to_video(text_to_video: Any, num_texts: int, num_videos: int) -> torch.Tensor:
    if text_to_video is None:
        if num_texts != num_videos:
            raise ValueError(f"sim is {num_texts} x {num_videos}: a non-square matrix needs text_to_video "
                             f"(the video index of each caption)")
        return torch.arange(num_texts)
    t2v = torch.as_tensor(np.asarray(text_to_video) if not isinstance(text_to_video, torch.Tensor)
                          else text_to_video.detach().cpu())
    if t2v.dtype.is_floating_point or t2v.dtype.is_complex or t2v.dtype == torch.bool:
        raise ValueError(f"text_to_video must hold integer video indices, got dtype {t2v.dtype}")
    if tuple(t2v.shape) != (num_texts,):
        raise ValueError(f"text_to_video must have shape ({num_texts},) to match sim's {num_texts} rows, "
                         f"got {tuple(t2v.shape)}")
    t2v = t2v.long()
    bad = (t2v < 0) | (t2v >= num_videos)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"text_to_video has {int(bad.sum())} index(es) outside [0, {num_videos}) for "
                         f"{num_videos} videos; the first is text_to_video[{i}] = {int(t2v[i])}")
    return t2v


def _check_modes(ties: str, v2t: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if v2t not in V2T_MODES:
        raise ValueError(f"v2t must be one of {V2T_MODES}, got {v2t!r}")


def _captions_per_video(t2v: torch.Tensor, num_videos: int, drop: str) -> torch.Tensor:
    """(num_videos,) caption counts; a video without a caption makes v2t undefined (``drop`` says what
    the caller should remove)."""
    captions = torch.bincount(t2v, minlength=num_videos)
    if bool((captions == 0).any()):
        missing = (captions == 0).nonzero()[:, 0]
        raise ValueError(f"{len(missing)} of {num_videos} videos have no caption in text_to_video (first: "
                         f"video {int(missing[0])}), so video->text retrieval is undefined; drop those "
                         f"{drop}")
    return captions


def _check_chunk_size(chunk_size: int | None, default: int) -> int:
    if chunk_size is None:
        return max(default, 1)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


# ------------------------------------------------------------------------------- tie statistics (g, e, c)

def _t2v_stats(sim, t2v: torch.Tensor, chunk: int):
    """Per caption: g = #videos scoring above its video, e = #videos tying with it (itself included)."""
    num_texts = sim.shape[0]
    greater = torch.empty(num_texts, dtype=torch.long)
    equal = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk):
        block = _block(sim, slice(start, start + chunk))
        idx = t2v[start:start + block.shape[0]].to(block.device)
        own = block.gather(1, idx[:, None])  # (c, 1)
        greater[start:start + block.shape[0]] = (block > own).sum(1, dtype=_COUNT).cpu()
        equal[start:start + block.shape[0]] = (block == own).sum(1, dtype=_COUNT).cpu()
    return greater, equal, torch.ones_like(greater)


def _own_scores(sim, t2v: torch.Tensor, chunk: int) -> torch.Tensor:
    """sim[t, text_to_video[t]] for every caption t, (num_texts,), in sim's dtype."""
    parts = []
    for start in range(0, sim.shape[0], chunk):
        block = _block(sim, slice(start, start + chunk))
        idx = t2v[start:start + block.shape[0]].to(block.device)
        parts.append(block.gather(1, idx[:, None])[:, 0].cpu())
    return torch.cat(parts)


def _v2t_best_stats(sim, t2v: torch.Tensor, chunk: int):
    """Per video v, ranked over all captions by sim[:, v]: s*_v = best correct caption's score,
    g = #captions above s*_v, e = #captions equal to s*_v, c = #correct captions equal to s*_v."""
    num_videos = sim.shape[1]
    own = _own_scores(sim, t2v, chunk)
    best = torch.zeros(num_videos, dtype=own.dtype).scatter_reduce(0, t2v, own, "amax", include_self=False)
    c = torch.zeros(num_videos, dtype=torch.long).index_add_(0, t2v, (own == best[t2v]).long())
    greater = torch.zeros(num_videos, dtype=torch.long)
    equal = torch.zeros(num_videos, dtype=torch.long)
    for start in range(0, sim.shape[0], chunk):
        block = _block(sim, slice(start, start + chunk))
        b = best.to(block.device)[None, :]
        greater += (block > b).sum(0, dtype=_COUNT).cpu()
        equal += (block == b).sum(0, dtype=_COUNT).cpu()
    return greater, equal, c


def _lowest(dtype: torch.dtype) -> float | int:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min


def _v2t_maxpool_stats(sim, t2v: torch.Tensor, chunk: int):
    """Per video v, ranked over the V caption groups by S[u, v] = max_{t in u} sim[t, v] (CLIP4Clip).
    S is built ``chunk`` video columns at a time from (chunk x chunk) tiles of sim, so neither S nor a
    (num_texts, chunk) slice is ever held whole."""
    num_texts, num_videos = sim.shape
    greater = torch.empty(num_videos, dtype=torch.long)
    equal = torch.empty(num_videos, dtype=torch.long)
    for start in range(0, num_videos, chunk):
        pooled = None
        for row in range(0, num_texts, chunk):
            block = _block(sim, slice(row, row + chunk), slice(start, start + chunk))  # (rows, c)
            if pooled is None:
                # every video has a caption, so the lowest representable value never survives the max
                pooled = torch.full((num_videos, block.shape[1]), _lowest(block.dtype), dtype=block.dtype,
                                    device=block.device)
            index = t2v[row:row + block.shape[0]].to(block.device)[:, None].expand_as(block)
            pooled.scatter_reduce_(0, index, block, "amax")  # S[:, start:start + c]
        width = pooled.shape[1]
        cols = torch.arange(start, start + width, device=pooled.device)
        own = pooled.gather(0, cols[None, :])  # (1, c): S[v, v]
        greater[start:start + width] = (pooled > own).sum(0, dtype=_COUNT).cpu()
        equal[start:start + width] = (pooled == own).sum(0, dtype=_COUNT).cpu()
    return greater, equal, torch.ones_like(greater)


# ------------------------------------------------------------------------------------------- metrics

def _ranks(g: np.ndarray, e: np.ndarray, c: np.ndarray, ties: str) -> np.ndarray:
    if ties == "optimistic":
        return g + 1.0
    if ties == "pessimistic":
        return g + e - c + 1.0
    if ties == "average":
        # E[min of c distinct uniform positions in 1..e] = (e + 1) / (c + 1)
        return g + (e + 1.0) / (c + 1.0)
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def _hit_probability(g: np.ndarray, e: np.ndarray, c: np.ndarray, k: int, ties: str) -> np.ndarray:
    """P(rank <= k) per query; 0/1 for the deterministic tie rules."""
    if ties != "average":
        return (_ranks(g, e, c, ties) <= k).astype(np.float64)
    m = np.clip(k - g, 0, e)  # tied positions that fall inside the top k
    free = e - m
    # P(no correct item in the first m of e tied slots) = C(e - m, c) / C(e, c)
    valid = free >= c
    safe_free = np.where(valid, free, c)
    log_miss = gammaln(safe_free + 1.0) - gammaln(safe_free - c + 1.0) - gammaln(e + 1.0) + gammaln(e - c + 1.0)
    miss = np.where(valid, np.exp(log_miss), 0.0)
    return np.where(c == 1, m / e, 1.0 - miss)  # m / e: exact for the common single-correct case


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return tuple(int(k) for k in ks)


def _summarize(stats, ties: str, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    g, e, c = (x.numpy().astype(np.float64) for x in stats)
    ranks = _ranks(g, e, c, ties)
    out = {f"R@{k}": float(100.0 * _hit_probability(g, e, c, k, ties).mean()) for k in ks}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(ranks.mean())
    return out


def retrieval_metrics(sim, text_to_video=None, *, ties: str = "average", v2t: str = "best",
                      chunk_size: int | None = None, ks=RECALL_KS) -> dict[str, dict[str, float]]:
    """Text->video and video->text R@1/5/10, MdR, MnR of a similarity matrix.

    Args:
        sim: (num_texts, num_videos) numpy array or tensor (any device; float or int); higher = closer.
            NaN is rejected; +-inf are ordinary scores.
        text_to_video: (num_texts,) int, the video index of each caption; ``None`` = square matrix with
            caption i <-> video i.
        ties: "average" (default: expected value under random tie-breaking), "optimistic" or
            "pessimistic"; see the module docstring for the exact definitions.
        v2t: "best" (collaborative-experts: rank of the best-ranked correct caption among all captions)
            or "maxpool" (CLIP4Clip: max over each video's captions, then a V x V ranking). Identical
            for one caption per video.
        chunk_size: rank this many queries at a time (caption rows; for "maxpool" v2t, tiles of
            chunk_size captions x chunk_size videos) so that only O(chunk_size * num_videos) extra
            memory is used; ``None`` = all at once. Results are identical.
        ks: the K of the R@K entries (default 1, 5, 10; ActivityNet papers add 50).

    Returns:
        ``{"t2v": {"R@1", "R@5", "R@10", "MdR", "MnR"}, "v2t": {...}}`` as Python floats (one R@K per
        entry of ``ks``); R@K in percent, ranks 1-based.

    Raises:
        ValueError: non-2-D or empty sim, NaN in sim, text_to_video of the wrong shape/dtype or out of
            range, a non-square sim without text_to_video, videos with no caption (v2t undefined),
            unknown ties/v2t, bad chunk_size.
    """
    _check_modes(ties, v2t)
    ks = _check_ks(ks)
    sim = _check_sim(sim)
    num_texts, num_videos = sim.shape
    t2v = _check_text_to_video(text_to_video, num_texts, num_videos)
    row_chunk = _check_chunk_size(chunk_size, num_texts)
    _check_nan(sim, row_chunk)
    captions = _captions_per_video(t2v, num_videos, "columns from sim")
    with torch.no_grad():
        t2v_stats = _t2v_stats(sim, t2v, row_chunk)
        if v2t == "best":
            v2t_stats = _v2t_best_stats(sim, t2v, row_chunk)
        else:
            v2t_stats = _v2t_maxpool_stats(sim, t2v, _check_chunk_size(chunk_size, max(num_texts, num_videos)))
    return {"t2v": _summarize(t2v_stats, ties, ks), "v2t": _summarize(v2t_stats, ties, ks)}


# --------------------------------------------------------------------------- from embeddings

# elements of one score block (rows x (num_texts + num_videos)) held at a time by default: 256 MiB of
# float32 on CPU; more on CUDA, where the matmul needs wide blocks to be efficient
_BLOCK_ELEMENTS = {"cpu": 2**26, "cuda": 2**28}


class _Product:
    """The lazy matrix ``a @ b.T`` of shape (len(a), len(b)): ``[rows, cols]`` computes that block only,
    so the sim-based stat helpers above run on it unchanged."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self.shape = (a.shape[0], b.shape[0])

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key
        return self.a[rows] @ self.b[cols].T


class _MaxPooledProduct:
    """The lazy (num_videos, num_videos) matrix P[v, u] = max_{t: text_to_video[t] = u} <video_v, text_t>,
    i.e. CLIP4Clip's S[u, v] transposed: row v holds video v's query scores against every caption group.
    A row block pools one (rows, num_texts) product block; every video has a caption, so the lowest
    representable value never survives the max."""

    def __init__(self, video: torch.Tensor, text: torch.Tensor, t2v: torch.Tensor):
        self.video, self.text = video, text
        self.t2v = t2v.to(video.device)
        self.shape = (video.shape[0], video.shape[0])

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = key
        if cols != slice(None):
            raise ValueError("_MaxPooledProduct is read in whole rows only")
        block = self.video[rows] @ self.text.T  # (r, num_texts)
        pooled = torch.full((block.shape[0], self.shape[1]), _lowest(block.dtype), dtype=block.dtype,
                            device=block.device)
        return pooled.scatter_reduce_(1, self.t2v[None, :].expand_as(block), block, "amax")


def _best_row_stats(sim, t2v: torch.Tensor, chunk: int):
    """v2t "best" with videos as ROWS of ``sim`` (num_videos, num_texts): per video v, s*_v = the best
    score among its captions, g / e = #captions above / equal to s*_v, c = #correct captions at s*_v.
    The row-wise twin of :func:`_v2t_best_stats` (which walks caption rows of a texts x videos matrix)."""
    num_videos = sim.shape[0]
    order = torch.argsort(t2v, stable=True)  # captions grouped by video
    offsets = torch.zeros(num_videos + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(t2v, minlength=num_videos).cumsum(0)
    greater = torch.empty(num_videos, dtype=torch.long)
    equal = torch.empty(num_videos, dtype=torch.long)
    correct = torch.empty(num_videos, dtype=torch.long)
    for start in range(0, num_videos, chunk):
        block = _block(sim, slice(start, start + chunk))  # (r, num_texts)
        r = block.shape[0]
        captions = order[offsets[start]:offsets[start + r]].to(block.device)
        rows = t2v.to(block.device)[captions] - start
        own = block[rows, captions]
        best = torch.full((r,), _lowest(block.dtype), dtype=block.dtype, device=block.device)
        best.scatter_reduce_(0, rows, own, "amax")
        correct[start:start + r] = torch.bincount(rows[own == best[rows]], minlength=r).cpu()
        greater[start:start + r] = (block > best[:, None]).sum(1, dtype=_COUNT).cpu()
        equal[start:start + r] = (block == best[:, None]).sum(1, dtype=_COUNT).cpu()
    return greater, equal, correct


def _check_embeddings(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C"))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (num, dim) array, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
        x = x.double()
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s); the first is at (row {r}, column {c})")
    return x.detach()


def retrieval_metrics_from_embeddings(text_emb, video_emb, text_to_video=None, *, ties: str = "average",
                                      v2t: str = "best", chunk_size: int | None = None, ks=RECALL_KS
                                      ) -> dict[str, dict[str, float]]:
    """:func:`retrieval_metrics` of ``text_emb @ video_emb.T`` without ever forming that matrix.

    Scores are computed ``chunk_size`` queries at a time (t2v: caption rows against all videos; v2t:
    video rows against all captions, max-pooled per caption group for "maxpool"); only per-query
    counts are kept (see the module docstring, "From embeddings"). Runs where the tensors are: CUDA
    tensors are ranked on their GPU.

    Args:
        text_emb: (num_texts, D) numpy array or tensor; ``text_emb[t] . video_emb[v]`` is the score
            (normalise first for cosine similarity).
        video_emb: (num_videos, D), same device as ``text_emb``.
        text_to_video, ties, v2t, ks: as :func:`retrieval_metrics`.
        chunk_size: queries per block; ``None`` picks blocks of at most 2**26 (CPU) / 2**28 (CUDA) scores
            counting both the product and, for "maxpool", the pooled block. Results do not depend on it.

    Returns:
        The same dict as :func:`retrieval_metrics`.

    Raises:
        ValueError: as :func:`retrieval_metrics`, plus embeddings that are not 2-D, differ in D or device,
            or hold NaN / inf (whose products would be NaN).
    """
    _check_modes(ties, v2t)
    ks = _check_ks(ks)
    text = _check_embeddings(text_emb, "text_emb")
    video = _check_embeddings(video_emb, "video_emb")
    if text.shape[1] != video.shape[1]:
        raise ValueError(f"text_emb has dimension {text.shape[1]} but video_emb has {video.shape[1]}")
    if text.device != video.device:
        raise ValueError(f"text_emb is on {text.device} but video_emb is on {video.device}")
    dtype = torch.promote_types(text.dtype, video.dtype)
    text, video = text.to(dtype), video.to(dtype)
    num_texts, num_videos = text.shape[0], video.shape[0]
    t2v = _check_text_to_video(text_to_video, num_texts, num_videos)
    captions = _captions_per_video(t2v, num_videos, "videos from video_emb")
    budget = _BLOCK_ELEMENTS["cuda" if text.device.type == "cuda" else "cpu"]
    chunk = _check_chunk_size(chunk_size, budget // (num_texts + num_videos))
    with torch.no_grad():
        t2v_stats = _t2v_stats(_Product(text, video), t2v, chunk)
        if v2t == "best" or bool((captions == 1).all()):  # one caption per video: the two modes agree
            v2t_stats = _best_row_stats(_Product(video, text), t2v, chunk)
        else:
            v2t_stats = _t2v_stats(_MaxPooledProduct(video, text, t2v), torch.arange(num_videos), chunk)
    return {"t2v": _summarize(t2v_stats, ties, ks), "v2t": _summarize(v2t_stats, ties, ks)}


# ----------------------------------------------------------------------- transductive re-scoring

def _to_float_tensor(x, name: str) -> torch.Tensor:
    x = _check_sim(x, name)
    t = _block(x, slice(None))
    return t if t.dtype.is_floating_point else t.double()


def dual_softmax(sim, temperature: float):
    """Dual softmax inference (DSL; Cheng et al. 2021, "Improving Video-Text Retrieval by Multi-Stream
    Corpus Alignment and Dual Softmax Loss", arXiv 2109.04290):

        sim' = sim * softmax(sim / temperature, over the query axis) * N

    For a (num_texts, num_videos) t2v matrix the prior softmax runs over the captions (axis 0), i.e.
    for each video, how much this caption stands out among all test captions; N = num_texts (as the
    official code's ``len(sim_matrix)``; it does not change any ranking). For v2t pass ``sim.T``.
    Transductive: every score depends on all test queries, so report the result apart from the plain
    numbers.

    Args:
        sim: (num_queries, num_items) numpy array or tensor.
        temperature: tau > 0 (the papers use 1 at inference with temperature-scaled CLIP logits).

    Returns:
        (num_queries, num_items), the same kind (numpy / tensor) and float dtype as ``sim``.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    was_numpy = not isinstance(sim, torch.Tensor)
    s = _to_float_tensor(sim, "sim")
    out = s * torch.softmax(s / temperature, dim=0) * s.shape[0]
    return out.numpy() if was_numpy else out


def querybank_normalize(sim, bank_sim, beta: float = 20.0, k: int = 1):
    """Querybank normalisation with the dynamic inverted softmax (QB-Norm; Bogolin et al., "Cross Modal
    Retrieval with Querybank Normalisation", CVPR 2022; official ``dynamic_inverted_softmax.py``).

    With a bank of B queries (e.g. training captions) scored against the same gallery:

    - activated set A = the gallery items appearing in the top k of at least one bank query;
    - for a query whose top-1 item (first maximum) is in A: sim'[q, j] = exp(beta s_qj) / sum_b exp(beta b_bj)
      (the inverted softmax, paper Eq. 4-5); every other query keeps its raw scores (the "dynamic" part).

    Only the within-row ranking of each query changes, so use it for t2v (queries = rows). The
    normaliser is computed in log space and the result in float64, so large beta does not overflow
    where the official numpy code would. Ties in the bank's top k are broken by ``torch.topk``.
    Uses extra data (and, with the test queries as bank, is transductive): report apart.

    Args:
        sim: (num_queries, num_items) numpy array or tensor.
        bank_sim: (num_bank, num_items) bank queries vs the same items.
        beta: inverse temperature > 0 (official default 20).
        k: top-k of each bank query forming the activated set, 1 <= k <= num_items (official default 1).

    Returns:
        (num_queries, num_items) float64, numpy if ``sim`` is numpy else a tensor.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    was_numpy = not isinstance(sim, torch.Tensor)
    s = _to_float_tensor(sim, "sim").double()
    bank = _to_float_tensor(bank_sim, "bank_sim").to(device=s.device, dtype=torch.float64)
    if bank.shape[1] != s.shape[1]:
        raise ValueError(f"bank_sim has {bank.shape[1]} items (columns) but sim has {s.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be an int in [1, {s.shape[1]}], got {k!r}")
    for name, x in (("sim", s), ("bank_sim", bank)):
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contains {int(torch.isnan(x).sum())} NaN value(s)")
    activated = torch.zeros(s.shape[1], dtype=torch.bool, device=s.device)
    activated[bank.topk(int(k), dim=1).indices.reshape(-1)] = True
    log_norm = torch.logsumexp(beta * bank, dim=0)  # log sum_b exp(beta b_bj), (num_items,)
    rows = activated[s.argmax(dim=1)]
    out = s.clone()
    out[rows] = torch.exp(beta * s[rows] - log_norm)
    return out.cpu().numpy() if was_numpy else out
