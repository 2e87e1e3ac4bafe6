"""Per-modality encoders and decoders."""

from mmvq.modalities.audio import AudioDecoder, AudioEncoder
from mmvq.modalities.image import ImageDecoder, ImageEncoder
from mmvq.modalities.text import TextDecoder, TextEncoder

__all__ = [
    "AudioDecoder",
    "AudioEncoder",
    "ImageDecoder",
    "ImageEncoder",
    "TextDecoder",
    "TextEncoder",
]
