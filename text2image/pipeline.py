"""XMC-GAN as a diffusers pipeline: prompts -> frozen text encoder -> XMC-GAN generator -> images.

    from text2image.pipeline import XMCGANPipeline
    pipe = XMCGANPipeline.from_pretrained("exported/xmcgan-shapes")          # a `cmgen export` folder
    g = torch.Generator().manual_seed(0)
    images = pipe(["a red circle on the left"], num_images_per_prompt=4, generator=g).images   # 4 PIL images

The pipeline holds three components, each saved in its own subfolder by ``save_pretrained`` and listed
in ``model_index.json``: ``generator`` (:class:`text2image.xmcgan.XMCGenerator`, a diffusers
``ModelMixin``), ``text_encoder`` (a transformers model: BERT-base for the paper configs, the packaged
MiniLM for the embedded data) and ``tokenizer``. ``max_tokens`` and ``pooling`` are pipeline config
values, so the text features are those of training: the prompts go through
:class:`text2image.text_encoder.TextEncoder` with the same tokenisation (``[CLS] ... [SEP]`` padded to
``max_tokens``), word mask and sentence pooling (``official_sum`` in the XMC-GAN configs) as
``XMCGANMethod`` used.

Sampling follows the official ``train_utils.py::generate_batch`` (commit
22a7ef2914787904949fe1fc3f5e560f1e75db29): ``z ~ N(0, I)^{z_dim}`` and ``generator(train=False)``, i.e. G
in eval mode with its BatchNorm running statistics, so an image depends only on its own prompt and z,
never on the other images of the call. All z are drawn at once from ``generator`` (``(P * k, z_dim)`` for
P prompts and k images per prompt, prompt-major), on the CPU when the torch.Generator is a CPU one, so a
seed gives the same images on every device and in every batch split.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from text2image.text_encoder import TextEncoder
from text2image.xmcgan import XMCGenerator

__all__ = ["XMCGANPipeline", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt")


class XMCGANPipeline(DiffusionPipeline):
    """Text-to-image with a trained XMC-GAN generator.

    Args:
        generator: :class:`~text2image.xmcgan.XMCGenerator` (its ``word_dim`` / ``sentence_dim`` must equal
            the text encoder's hidden size).
        text_encoder: a transformers model whose ``last_hidden_state`` gives the word features
            (``BertModel``); kept frozen and in eval mode.
        tokenizer: its tokenizer.
        max_tokens: T, the padded caption length including ``[CLS]`` and ``[SEP]`` (17 COCO, 64 LN-COCO).
        pooling: sentence feature, one of :class:`~text2image.text_encoder.TextEncoder`'s poolings
            (``"official_sum"``: sum over all T positions / number of valid tokens, as the official
            ``preprocess_data.py``).
    """

    model_cpu_offload_seq = "text_encoder->generator"

    def __init__(self, generator: XMCGenerator, text_encoder, tokenizer, max_tokens: int = 17,
                 pooling: str = "official_sum"):
        super().__init__()
        hidden = int(text_encoder.config.hidden_size)
        if (generator.config.word_dim, generator.config.sentence_dim) != (hidden, hidden):
            raise ValueError(f"the generator takes word_dim={generator.config.word_dim}, sentence_dim="
                             f"{generator.config.sentence_dim} text features, the text encoder gives {hidden}")
        self.register_modules(generator=generator, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(max_tokens=int(max_tokens), pooling=pooling)
        self._features()   # validates max_tokens / pooling against the encoder, freezes it

    def _features(self) -> TextEncoder:
        """The training-time feature code over the current components (cheap: wraps, copies nothing)."""
        return TextEncoder(max_tokens=self.config.max_tokens, pooling=self.config.pooling, model=self.text_encoder,
                           tokenizer=self.tokenizer)

    @classmethod
    def from_text_encoder(cls, generator: XMCGenerator, text: TextEncoder) -> "XMCGANPipeline":
        """The pipeline of a generator and the :class:`TextEncoder` it was trained with."""
        return cls(generator, text.model, text.tokenizer, max_tokens=text.max_tokens, pooling=text.pooling)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts (B) -> words ``(B, T, D)``, word_mask ``(B, T)`` bool, sentence ``(B, D)`` on G's device."""
        words, mask, sentence = self._features().encode(list(prompts))
        device, dtype = self.generator.device, self.generator.dtype
        return words.to(device, dtype), mask.to(device), sentence.to(device, dtype)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], num_images_per_prompt: int = 1,
                 generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True) -> Union[ImagePipelineOutput, tuple]:
        """Generate ``num_images_per_prompt`` images for every prompt.

        Args:
            prompt: one caption or a list of P captions.
            num_images_per_prompt: k; images come prompt-major (k of prompt 0, then k of prompt 1, ...).
            generator: torch.Generator (or one per image) for z; None = the global RNG.
            latents: z ``(P * k, z_dim)`` to use instead of drawing it.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (``(N, H, W, 3)`` float32 in [0, 1]) or
                ``"pt"`` (``(N, 3, H, W)`` float tensor in [0, 1]).
            return_dict: False returns the tuple ``(images,)``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        n, z_dim = len(prompts) * num_images_per_prompt, self.generator.config.z_dim
        device, dtype = self.generator.device, self.generator.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images")
            latents = randn_tensor((n, z_dim), generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != (n, z_dim):
            raise ValueError(f"latents must be ({n}, {z_dim}) for {len(prompts)} prompts x {num_images_per_prompt}, "
                             f"got {tuple(latents.shape)}")
        words, mask, sentence = self.encode_prompt(prompts)
        words, mask, sentence = (t.repeat_interleave(num_images_per_prompt, dim=0) for t in (words, mask, sentence))
        was_training = self.generator.training
        self.generator.eval()      # official generate_batch: generator(train=False)
        try:
            images = self.generator(latents.to(device, dtype), words, mask, sentence)
        finally:
            self.generator.train(was_training)
        images = images.float().clamp(0.0, 1.0)
        if output_type == "pt":
            out: Union[torch.Tensor, np.ndarray, list] = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
