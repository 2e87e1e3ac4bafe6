"""Per-modality encoders and decoders."""

from mmvq.modalities.audio import AudioDecoder, AudioEncoder
from mmvq.modalities.image import (
    ImageDecoder,
    ImageEncoder,
    VQGANDecoder,
    VQGANEncoder,
    build_image_codec,
)
from mmvq.modalities.text import TextDecoder, TextEncoder

__all__ = [
    "AudioDecoder",
    "AudioEncoder",
    "ImageDecoder",
    "ImageEncoder",
    "TextDecoder",
    "TextEncoder",
    "VQGANDecoder",
    "VQGANEncoder",
    "build_image_codec",
]
