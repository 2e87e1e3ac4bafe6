"""mmvq: multimodal vector-quantized tokenizers (image, audio, text).

The model library: configs, per-modality codecs, quantizers, losses, metrics, the tokenizer API
and plain-torch train steps. Imports only torch, torchaudio, torchvision, numpy, einops and
safetensors (checkpoints); never Ray, MLflow or webdataset.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmvq.batch import ModelInputs, to_model_inputs
    from mmvq.config import TokenizerConfig
    from mmvq.tokenizer import MultimodalTokenizer, TokenizerOutput

# The public names, imported on first use (PEP 562): ``import mmvq.config_io`` (what a config
# loader or ``mmvq --help`` needs) must not pay the second that importing torch takes.
_LAZY = {"ModelInputs": "mmvq.batch", "to_model_inputs": "mmvq.batch",
         "TokenizerConfig": "mmvq.config", "MultimodalTokenizer": "mmvq.tokenizer",
         "TokenizerOutput": "mmvq.tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmvq' has no attribute {name!r}")


__all__ = [
    "ModelInputs",
    "MultimodalTokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "to_model_inputs",
]
