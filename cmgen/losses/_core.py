"""The one shared core of every batch-negative loss: a masked, chunked log-sum-exp of scaled dot products.

For rows q_i (N, D) and columns k_j (M, D) it returns, per row,

    lse_i = log sum_{j allowed for i} exp(scale * q_i . k_j + bias_j)            (N,)

which is the denominator (or any other "log of a sum of exponentials") of InfoNCE, NT-Xent, SupCon,
SelfCon, 2C, DCL and HCL. Linear terms such as the positive logit are computed by the callers with
O(N D) work, so no loss ever needs the (N, M) logit matrix.

Memory: the forward walks over blocks of rows and keeps only one (block, M) tile; it saves q, k, bias and
lse (O((N + M) D)) and the backward recomputes each tile, turns it into the softmax weights
P_ij = exp(logit_ij - lse_i) * grad_i in place and accumulates dq = scale P k, dk = scale P^T q,
dbias = sum_i P_ij. With ``k=None`` (self-similarity, the SimCLR/SupCon/2C/DCL/HCL case) the logit
matrix is symmetric, so only tiles with I <= J are computed: the forward reduces each tile along both
axes and the backward uses dZ = scale (G + G^T) Z, halving the matmuls.

Which columns a row may use is described structurally so it can be built tile by tile:
``exclude`` (one column per row, e.g. the row itself), ``row_labels``/``col_labels`` with
``label_mode`` "same" or "different", and an optional dense bool ``mask`` (N, M) sliced per tile.

Logits are computed in float32 (float64 stays float64) with autocast disabled, so fp16/bf16 inputs under
autocast still give a float32 log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["masked_logsumexp", "rowdot", "check_temperature", "check_pair", "check_chunk_size"]

# Default tile budget when chunk_size is None: rows per tile are chosen so that one tile holds about
# this many elements (16 MiB in float32) — small enough to stay in memory bandwidth-friendly sizes,
# large enough that the matmuls run at full speed.
_AUTO_TILE_ELEMENTS = 1 << 22
# Square tile side for the symmetric path when chunk_size is None (16 MiB float32 tiles). Fewer, larger
# tiles mean fewer OpenMP parallel regions, which matters on a busy 2-core machine: with 1024 the
# NT-Xent N=4096 fwd+bwd slowed ~5x under load, with 2048 ~3x.
_AUTO_SYM_BLOCK = 2048


def check_temperature(temperature: float, name: str = "temperature") -> float:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name} must be a positive number, got {temperature!r}")
    return float(temperature)


def check_pair(a: torch.Tensor, b: torch.Tensor, names: str = "z0, z1") -> None:
    """Both (N, D) with the same shape."""
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must both be (N, D) with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product (N, D), (N, D) -> (N,) in float32 (float64 stays float64), for linear terms."""
    dtype = _compute_dtype(a, b)
    return (a.to(dtype) * b.to(dtype)).sum(1)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@dataclass
class _Spec:
    scale: float
    exclude: torch.Tensor | None      # (N,) long, the column each row drops (may be out of range = none)
    row_labels: torch.Tensor | None   # (N,)
    col_labels: torch.Tensor | None   # (M,)
    label_mode: str | None            # "same" | "different"
    mask: torch.Tensor | None         # (N, M) bool, True = allowed
    chunk: int | None

    def apply_mask(self, s: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Set disallowed entries of the tile s = logits[r0:r1, c0:c1] to -inf, in place."""
        if self.exclude is not None:
            ex = self.exclude[r0:r1]
            hit = (ex >= c0) & (ex < c1)
            rows = torch.nonzero(hit, as_tuple=True)[0]
            if rows.numel():
                s[rows, ex[rows] - c0] = float("-inf")
        if self.label_mode is not None:
            same = self.row_labels[r0:r1, None] == self.col_labels[None, c0:c1]
            s.masked_fill_(~same if self.label_mode == "same" else same, float("-inf"))
        if self.mask is not None:
            s.masked_fill_(~self.mask[r0:r1, c0:c1], float("-inf"))
        return s

    def apply_mask_rows(self, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Same for s = logits[rows, :] with an index tensor of rows and every column."""
        if self.exclude is not None:
            ex = self.exclude[rows]
            hit = (ex >= 0) & (ex < s.shape[1])
            r = torch.nonzero(hit, as_tuple=True)[0]
            s[r, ex[r]] = float("-inf")
        if self.label_mode is not None:
            same = self.row_labels[rows, None] == self.col_labels[None, :]
            s.masked_fill_(~same if self.label_mode == "same" else same, float("-inf"))
        if self.mask is not None:
            s.masked_fill_(~self.mask[rows], float("-inf"))
        return s


def _row_weights(g: torch.Tensor, lse: torch.Tensor, c) -> torch.Tensor:
    """Backward row factors for tiles shifted by c: P_ij = exp(S_ij - c_i) u_i with u_i = g_i exp(c_i - lse_i)
    (u_i = g_i when c = lse), 0 for rows with no allowed column."""
    return torch.where(torch.isfinite(lse), g * torch.exp(c - _finite_or_zero(lse)), 0.0)


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # A row with no allowed column has lse = -inf; its tile is all -inf, and exp(-inf - 0) = 0 keeps the
    # backward free of (-inf) - (-inf) = nan.
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


class _MaskedLSE(torch.autograd.Function):
    """Rectangular case: rows q (N, D) against columns k (M, D), tiles of (rows, M).

    Fast path (one exp per tile, as in :class:`_SymmetricLSE`): the per-row bound
    c_i = scale |q_i| max_j |k_j| + max_j bias_j (Cauchy-Schwarz) makes E = exp(S - c) <= 1, and the
    augmented factors [scale q, 1, -c] (N, D + 2) and [k, bias, 1] (M, D + 2) give S - c straight out of
    the matmul, so a tile costs one matmul, one exp and one row sum. Backward: P_ij = exp(S_ij - lse_i) g_i
    = E_ij u_i with u_i = g_i exp(c_i - lse_i). A row whose sum falls below 2^-60 (every logit far below
    its bound) is recomputed with a max shift; if such a row is not empty the call uses the stable path
    (two exps per tile), which is exact for any input.
    """

    @staticmethod
    def forward(ctx, q, k, bias, spec: _Spec):
        dtype = _compute_dtype(q, k, bias)
        with torch.autocast(q.device.type, enabled=False):
            qc, kc = q.to(dtype), k.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            n, m = qc.shape[0], kc.shape[0]
            rows = spec.chunk or max(1, min(n, _AUTO_TILE_ELEMENTS // max(m, 1)))
            c = _row_bounds(qc, kc, bc, spec.scale)
            qa, ka = _rect_factors(qc, kc, bc, spec.scale, c)
            # chunk_size=None and a small problem: keep the exp tiles for backward instead of recomputing
            # them (the MoCo case, N x K = 256 x 65536, saves one of three matmuls).
            keep = spec.chunk is None and n * m <= _KEEP_ELEMENTS
            kept = []
            sums = qc.new_empty(n)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                e = spec.apply_mask(torch.mm(qa[r0:r1], ka.t()), r0, r1, 0, m).exp_()
                torch.sum(e, dim=1, out=sums[r0:r1])
                if keep:
                    kept.append(e)
            low = torch.nonzero(sums < _LOW_SUM, as_tuple=True)[0]
            lse = sums.log_().add_(c)
            stable = False
            if low.numel():
                lse[low] = _rect_stable_rows(qc, kc, bc, spec, low, rows)
                stable = bool(torch.isfinite(lse[low]).any())
        ctx.save_for_backward(q, k, bias, lse, c)
        ctx.spec, ctx.rows, ctx.stable = spec, rows, stable
        ctx.kept = kept if not stable else []
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        q, k, bias, lse, c = ctx.saved_tensors
        spec, rows = ctx.spec, ctx.rows
        dtype = lse.dtype
        with torch.autocast(q.device.type, enabled=False):
            qc, kc = q.to(dtype), k.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            g = grad_lse.to(dtype)
            n, m = qc.shape[0], kc.shape[0]
            need_q, need_k, need_b = ctx.needs_input_grad[:3]
            dq = torch.empty_like(qc) if need_q else None
            dk = torch.zeros_like(kc) if need_k else None
            db = torch.zeros_like(bc) if need_b else None
            if ctx.stable:
                # P = exp(S - lse) g from the max-shifted logits (kept tiles are never used here)
                c = _finite_or_zero(lse)
            qa, ka = _rect_factors(qc, kc, bc, spec.scale, c)
            u = _row_weights(g, lse, c)
            for t, r0 in enumerate(range(0, n, rows)):
                r1 = min(n, r0 + rows)
                # P = softmax weights of the tile times the incoming gradient (a kept tile is left
                # untouched, so a second backward with retain_graph=True sees it unchanged)
                if ctx.kept:
                    p = ctx.kept[t] * u[r0:r1, None]
                else:
                    p = spec.apply_mask(torch.mm(qa[r0:r1], ka.t()), r0, r1, 0, m).exp_().mul_(u[r0:r1, None])
                if need_q:
                    torch.mm(p, kc, out=dq[r0:r1])
                if need_k:
                    dk.addmm_(p.t(), qc[r0:r1])
                if need_b:
                    db += p.sum(0)
            if need_q:
                dq.mul_(spec.scale)
            if need_k:
                dk.mul_(spec.scale)
        return (dq.to(q.dtype) if need_q else None, dk.to(k.dtype) if need_k else None,
                db.to(bias.dtype) if need_b else None, None)


# chunk_size=None keeps the forward's exp tiles for backward up to this many elements (128 MiB in fp32).
_KEEP_ELEMENTS = 1 << 25

# Stands in for a -inf bias inside the augmented matmul (exp of it is exactly 0, and no inf - inf = nan
# can arise); the column mask semantics are unchanged.
_NEG_BIG = -1e30


def _row_bounds(qc: torch.Tensor, kc: torch.Tensor, bc: torch.Tensor | None, scale: float) -> torch.Tensor:
    """(N,) upper bounds c_i >= scale q_i . k_j + bias_j for every j (Cauchy-Schwarz)."""
    kmax = kc.norm(dim=1).max() if kc.shape[0] else kc.new_zeros(())
    c = scale * qc.norm(dim=1) * kmax
    if bc is not None:
        finite = bc[torch.isfinite(bc)]
        if finite.numel():
            c = c + finite.max()
    return c


def _rect_factors(qc, kc, bc, scale: float, shift: torch.Tensor):
    """[scale q, 1, -shift] (N, D + 2) and [k, bias, 1] (M, D + 2): their product is
    scale q k^T + bias - shift, straight out of the matmul."""
    n, m = qc.shape[0], kc.shape[0]
    b = kc.new_zeros(m) if bc is None else bc.clamp(min=_NEG_BIG)
    qa = torch.cat([qc * scale, qc.new_ones(n, 1), -shift[:, None]], dim=1)
    ka = torch.cat([kc, b[:, None], kc.new_ones(m, 1)], dim=1)
    return qa, ka


def _rect_stable_rows(qc, kc, bc, spec: _Spec, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """Exact (max-shifted) LSE of the rows ``idx`` against every column."""
    out = qc.new_empty(idx.numel())
    for a in range(0, idx.numel(), rows):
        sel = idx[a:a + rows]
        s = torch.mm(qc[sel], kc.t()).mul_(spec.scale)
        if bc is not None:
            s.add_(bc)
        out[a:a + rows] = torch.logsumexp(spec.apply_mask_rows(s, sel), dim=1)
    return out


class _SymmetricLSE(torch.autograd.Function):
    """Self-similarity case: rows and columns are the same z (N, D); mask is symmetric (no bias).

    Only tiles (I, J) with I <= J are computed, and every tile feeds both row blocks.

    Fast path (one exp per tile): c = scale * max_i |z_i|^2 bounds every logit (Cauchy-Schwarz), so
    E = exp(S - c) <= 1 never overflows and its row and column sums give both blocks' partial sums from one
    exp. Backward: G_ij = exp(S_ij - lse_i) g_i = E_ij u_i with u_i = g_i exp(c - lse_i), so the tile of
    G + G^T is E_IJ * (u_I + u_J^T), and dz = scale (G + G^T) z feeds dz_I and dz_J. A row whose sum falls
    below 2^-60 (every logit more than ~42 below the bound: tiny temperatures, unnormalised inputs) is
    recomputed with a per-row max shift; if such a row is not empty the whole call uses the stable path,
    which shifts every tile by its row (column) LSE: two exps per tile, still exact.
    """

    @staticmethod
    def forward(ctx, z, spec: _Spec):
        dtype = _compute_dtype(z)
        with torch.autocast(z.device.type, enabled=False):
            zc = z.to(dtype)
            n = zc.shape[0]
            b = spec.chunk or _AUTO_SYM_BLOCK
            tiles = _sym_tiles(n, b)
            c = spec.scale * float((zc * zc).sum(1).max()) if n else 0.0
            za, zb = _shifted_factors(zc, spec.scale, c)
            sums = zc.new_zeros(n)
            for r0, r1, c0, c1 in tiles:
                e = spec.apply_mask(torch.mm(za[r0:r1], zb[c0:c1].t()), r0, r1, c0, c1).exp_()
                sums[r0:r1] += e.sum(1)
                if c0 != r0:
                    sums[c0:c1] += e.sum(0)
            lse = sums.log_().add_(c)
            stable = False
            low = torch.nonzero(sums < _LOW_SUM, as_tuple=True)[0]
            if low.numel():
                lse[low] = _rect_stable_rows(zc, zc, None, spec, low,
                                             spec.chunk or max(1, _AUTO_TILE_ELEMENTS // max(n, 1)))
                stable = bool(torch.isfinite(lse[low]).any())
            if stable:
                lse = _sym_forward_stable(zc, spec, tiles)
        ctx.save_for_backward(z, lse)
        ctx.spec, ctx.tiles, ctx.c, ctx.stable = spec, tiles, c, stable
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        z, lse = ctx.saved_tensors
        spec, tiles = ctx.spec, ctx.tiles
        dtype = lse.dtype
        with torch.autocast(z.device.type, enabled=False):
            zc = z.to(dtype)
            g = grad_lse.to(dtype)
            if ctx.stable:
                dz = _sym_backward_stable(zc, spec, tiles, lse, g)
            else:
                dz = torch.zeros_like(zc)
                za, zb = _shifted_factors(zc, spec.scale, ctx.c)
                u = _row_weights(g, lse, ctx.c)
                for r0, r1, c0, c1 in tiles:
                    e = spec.apply_mask(torch.mm(za[r0:r1], zb[c0:c1].t()), r0, r1, c0, c1).exp_()
                    e.mul_(u[r0:r1, None] + u[None, c0:c1])
                    dz[r0:r1].addmm_(e, zc[c0:c1])
                    if c0 != r0:
                        dz[c0:c1].addmm_(e.t(), zc[r0:r1])
                dz.mul_(spec.scale)
        return dz.to(z.dtype), None


# A row sum of exp(S - c) below this has lost its largest term to the bound shift (see _SymmetricLSE).
_LOW_SUM = 2.0 ** -60


def _shifted_factors(zc: torch.Tensor, scale: float, c: float):
    """[scale z, -c] and [z, 1] (N, D + 1): their product is scale z z^T - c straight out of the matmul,
    saving a full pass over every tile."""
    ones = zc.new_ones(zc.shape[0], 1)
    return torch.cat([zc * scale, ones * -c], dim=1), torch.cat([zc, ones], dim=1)


def _sym_tiles(n: int, b: int) -> list[tuple[int, int, int, int]]:
    starts = list(range(0, n, b))
    return [(r0, min(n, r0 + b), c0, min(n, c0 + b)) for i, r0 in enumerate(starts) for c0 in starts[i:]]


def _sym_forward_stable(zc: torch.Tensor, spec: _Spec, tiles) -> torch.Tensor:
    lse = zc.new_full((zc.shape[0],), float("-inf"))
    for r0, r1, c0, c1 in tiles:
        s = _sym_tile(zc, spec, r0, r1, c0, c1)
        # merge this tile's partial sums into the running LSE of both row blocks
        torch.logaddexp(lse[r0:r1], torch.logsumexp(s, dim=1), out=lse[r0:r1])
        if c0 != r0:
            torch.logaddexp(lse[c0:c1], torch.logsumexp(s, dim=0), out=lse[c0:c1])
    return lse


def _sym_backward_stable(zc, spec: _Spec, tiles, lse, g) -> torch.Tensor:
    lse_safe = _finite_or_zero(lse)
    dz = torch.zeros_like(zc)
    for r0, r1, c0, c1 in tiles:
        s = _sym_tile(zc, spec, r0, r1, c0, c1)
        h = torch.sub(s, lse_safe[r0:r1, None]).exp_().mul_(g[r0:r1, None])
        if c0 == r0:
            h += h.t().clone()
            dz[r0:r1].addmm_(h, zc[r0:r1])
        else:
            h += s.sub_(lse_safe[None, c0:c1]).exp_().mul_(g[None, c0:c1])
            dz[r0:r1].addmm_(h, zc[c0:c1])
            dz[c0:c1].addmm_(h.t(), zc[r0:r1])
    return dz.mul_(spec.scale)


def _sym_tile(zc, spec: _Spec, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    s = torch.mm(zc[r0:r1], zc[c0:c1].t())
    s.mul_(spec.scale)
    return spec.apply_mask(s, r0, r1, c0, c1)


def masked_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    exclude: str | torch.Tensor | None = None,
    row_labels: torch.Tensor | None = None,
    col_labels: torch.Tensor | None = None,
    label_mode: str | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-row masked log-sum-exp of ``scale * q k^T + bias`` without materialising (N, M).

    Args:
        q: (N, D) rows.
        k: (M, D) columns; ``None`` means the columns are ``q`` itself (self-similarity), which uses the
            symmetric fast path when the column mask is symmetric (no ``bias``, no ``mask``).
        scale: multiplies every dot product (1 / temperature).
        bias: (M,) added to column j's logits (log-weights, ``log w_j``); ``-inf`` drops a column.
        exclude: ``"diagonal"`` (row i drops column i; needs N == M) or an (N,) long tensor giving the
            column each row drops (values outside [0, M) drop nothing).
        row_labels, col_labels: (N,), (M,) labels (``col_labels`` defaults to ``row_labels`` when
            ``k`` is None); with ``label_mode="same"`` a row keeps only columns with its label, with
            ``"different"`` only columns with another label.
        mask: (N, M) bool, True where the column is allowed.
        chunk_size: rows per tile (the symmetric path uses square tiles of this side); ``None`` picks
            tiles of about 4M elements (2048 x 2048 on the symmetric path). The value and gradient do not
            depend on it.

    Returns:
        (N,) float32 (float64 for float64 inputs). Rows with no allowed column give ``-inf``.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be (N, D), got shape {tuple(q.shape)}")
    if k is not None and (k.dim() != 2 or k.shape[1] != q.shape[1]):
        raise ValueError(f"k must be (M, D) with D = {q.shape[1]}, got shape {tuple(k.shape)}")
    check_chunk_size(chunk_size)
    n = q.shape[0]
    m = n if k is None else k.shape[0]
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"bias must be (M,) = ({m},), got {tuple(bias.shape)}")
    if mask is not None and (mask.shape != (n, m) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape ({n}, {m}), got {mask.dtype} {tuple(mask.shape)}")
    if label_mode not in (None, "same", "different"):
        raise ValueError(f"label_mode must be None, 'same' or 'different', got {label_mode!r}")
    if label_mode is not None:
        if row_labels is None:
            raise ValueError(f"label_mode={label_mode!r} needs row_labels")
        if col_labels is None and k is not None:
            raise ValueError(f"label_mode={label_mode!r} with explicit k needs col_labels")
        cl = row_labels if col_labels is None else col_labels
        if row_labels.shape != (n,) or cl.shape != (m,):
            raise ValueError(f"row_labels must be ({n},) and col_labels ({m},), got {tuple(row_labels.shape)} "
                             f"and {tuple(cl.shape)}")
    else:
        cl = None
    symmetric = k is None and bias is None and mask is None and col_labels is None
    if isinstance(exclude, str):
        if exclude != "diagonal":
            raise ValueError(f"exclude must be 'diagonal', an (N,) tensor or None, got {exclude!r}")
        if n != m:
            raise ValueError(f"exclude='diagonal' needs a square problem, got N={n}, M={m}")
        exclude_t = torch.arange(n, device=q.device)
    elif exclude is not None:
        if exclude.shape != (n,):
            raise ValueError(f"exclude must be ({n},), got {tuple(exclude.shape)}")
        exclude_t = exclude.to(device=q.device, dtype=torch.long)
        symmetric = False
    else:
        exclude_t = None
    spec = _Spec(float(scale), exclude_t, row_labels, cl, label_mode, mask, chunk_size)
    if symmetric:
        return _SymmetricLSE.apply(q, spec)
    return _MaskedLSE.apply(q, q if k is None else k, bias, spec)
