"""Model inputs: the preprocessed batch, moved to the device and normalised there.

The object store and the data loader carry compact types (uint8 pixels, int32 ids); conversion to
float happens here, on the accelerator, after the copy (DESIGN.md, "Preprocessed batch").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmvq.columns import MODEL_COLUMNS


@dataclass
class ModelInputs:
    """One batch as the tokenizer reads it.

    Attributes
    ----------
    image : (B, 3, H, W) float in [-1, 1]
    audio : (B, T) float waveform
    audio_len : (B,) long, real samples before zero padding
    text_ids : (B, L) long text vocabulary ids (mmvq.text_vocab: bytes or BPE), ``PAD_ID`` after
        ``text_len``
    text_len : (B,) long
    has_image, has_audio, has_text : (B,) bool, which samples carry each modality
    """

    image: torch.Tensor
    audio: torch.Tensor
    audio_len: torch.Tensor
    text_ids: torch.Tensor
    text_len: torch.Tensor
    has_image: torch.Tensor
    has_audio: torch.Tensor
    has_text: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> ModelInputs:
        """A copy with every tensor on ``device``."""
        return ModelInputs(
            **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )


def _tensor(value: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        # Ray Data hands out read-only views of Arrow buffers; torch warns on (and must not
        # write to) those, so they are copied once here.
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.array(value, order="C")
        value = torch.from_numpy(value)
    return value.to(device, non_blocking=True)


def to_model_inputs(
    batch: Mapping[str, np.ndarray | torch.Tensor], device: torch.device | str = "cpu"
) -> ModelInputs:
    """Convert a preprocessed batch to :class:`ModelInputs` on ``device``.

    Parameters
    ----------
    batch : mapping of column name to array
        ``image`` uint8 (B, H, W, 3), ``audio`` float32 (B, T), ``audio_len`` (B,),
        ``text_ids`` int (B, L), ``text_len`` (B,), ``has_image``/``has_audio``/``has_text``
        bool (B,). Other keys are ignored.
    device : where the tensors go; uint8 pixels are copied first and normalised there.

    Raises
    ------
    KeyError
        If a model column is missing (the message lists which).
    """
    missing = [c for c in MODEL_COLUMNS if c not in batch]
    if missing:
        raise KeyError(f"preprocessed batch lacks columns {missing}; has {sorted(batch)}")
    device = torch.device(device)
    pixels = _tensor(batch["image"], device)  # (B, H, W, 3) uint8
    image = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()  # (B, 3, H, W)
    return ModelInputs(
        image=image,
        audio=_tensor(batch["audio"], device).float(),
        audio_len=_tensor(batch["audio_len"], device).long(),
        text_ids=_tensor(batch["text_ids"], device).long(),
        text_len=_tensor(batch["text_len"], device).long(),
        has_image=_tensor(batch["has_image"], device).bool(),
        has_audio=_tensor(batch["has_audio"], device).bool(),
        has_text=_tensor(batch["has_text"], device).bool(),
    )
