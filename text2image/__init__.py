"""Text-to-image GANs (ContraGAN, ContraD, XMC-GAN) and their data and text encoders."""
from .data import CocoCaptions, ShapesAttributes, class_conditional_imagefolder, load_image
from .text_encoder import TextEncoder, default_text_encoder_path, masked_mean

__all__ = ["CocoCaptions", "ShapesAttributes", "class_conditional_imagefolder", "load_image",
           "TextEncoder", "default_text_encoder_path", "masked_mean"]
