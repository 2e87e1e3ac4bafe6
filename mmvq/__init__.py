"""mmvq: multimodal vector-quantized tokenizers (image, audio, text).

The model library: configs, per-modality codecs, quantizers, losses, metrics, the tokenizer API
and plain-torch train steps. Imports only torch, torchaudio, torchvision, numpy, einops and
safetensors (checkpoints); never Ray, MLflow or webdataset.
"""

from mmvq.batch import ModelInputs, to_model_inputs
from mmvq.config import TokenizerConfig
from mmvq.tokenizer import MultimodalTokenizer, TokenizerOutput

__all__ = [
    "ModelInputs",
    "MultimodalTokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "to_model_inputs",
]
