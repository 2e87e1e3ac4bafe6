"""The registered tokenizer's pyfunc model, logged as code: a registry entry holds no pickle.

MLflow's models-from-code: the register stage logs this file (``python_model=<this file>``);
MLflow executes it when a version is loaded and serves the model that
:func:`mlflow.models.set_model` names at the bottom. Everything else in the version is data:
the tokenizer directory (``config.json`` + ``model.safetensors``, read by
:meth:`mmvq.MultimodalTokenizer.load`, which never unpickles) as the ``tokenizer`` artifact,
and the ``mmvq`` and ``pipeline`` packages as ``code_paths``, which MLflow puts first on
``sys.path``. So ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` works in a process that
has no checkout of this repository, with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

It imports as little as it can: mmvq's model and the preprocess stage's pure sample function
(so predict sees exactly what training saw); not Ray, not the register or tokenize stages. The
rows it returns are the token dataset's rows for the same samples (tests compare them with
:class:`pipeline.codec.Codec`, which runs the tokenize stage's own actor).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from mmvq import MultimodalTokenizer, to_model_inputs
from mmvq.vocabulary import interleave
from pipeline.preprocess import BadSample, PreprocessConfig, Resamplers, preprocess_sample

ARTIFACT = "tokenizer"  # key of the tokenizer directory in the model's artifacts
INPUT_COLUMNS = ("key", "image", "audio", "text")
TOKEN_COLUMNS = ("image_tokens", "image_grid", "audio_tokens", "text_tokens", "joint_tokens",
                 "interleaved_tokens")
OUTPUT_COLUMNS = ("key", *TOKEN_COLUMNS, "audio_frames", "tokenizer")  # predict's, in order
# PIL and libsndfile put the stream's repr in their messages: meaningless to a caller.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class TokenizerModel(PythonModel):
    """A DataFrame of raw samples in, one token row per sample out.

    Input columns (each optional per row; a row needs at least one modality): ``key`` str,
    ``image`` encoded image bytes (PNG, JPEG, WebP), ``audio`` encoded audio bytes (WAV, FLAC,
    OGG, MP3), ``text`` str. Output columns: ``OUTPUT_COLUMNS``, code columns as int lists.
    """

    def load_context(self, context: Any) -> None:
        self.model = MultimodalTokenizer.load(context.artifacts[ARTIFACT]).eval()
        cfg = self.model.config
        # The preprocess stage's settings for this model: crop, rate, clip and text length.
        self.preprocess = PreprocessConfig(
            image_size=cfg.image.image_size, sample_rate=cfg.audio.sample_rate,
            audio_samples=cfg.audio.num_samples, text_max_len=cfg.text.max_len, required=())
        self.resample = Resamplers(cfg.audio.sample_rate)
        self.layout = self.model.vocabulary()
        self.tokenizer_id = f"local:{self.model.weights_hash()[:16]}"  # as tokenize writes it

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Token rows for the samples of ``model_input``, all or nothing.

        Raises
        ------
        ValueError
            For unknown columns, or the first sample that has no modality or does not decode
            (``sample 'KEY': reason``).
        """
        unknown = sorted(set(model_input.columns) - set(INPUT_COLUMNS))
        if unknown:
            raise ValueError(f"unknown input columns {unknown}; expected {list(INPUT_COLUMNS)}")
        rows = [self._prepare(row.get("key") or str(i), row)
                for i, row in enumerate(model_input.to_dict("records"))]
        return pd.DataFrame(self._encode(rows), columns=list(OUTPUT_COLUMNS))

    def _prepare(self, key: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """One input row -> the preprocessed columns (members keyed by extension)."""
        raw = {ext: _bytes(key, name, row.get(name))
               for ext, name in (("png", "image"), ("wav", "audio"), ("txt", "text"))}
        raw = {ext: value for ext, value in raw.items() if value is not None}
        if not raw:
            raise ValueError(f"sample {key!r}: no image, audio or text")
        try:
            prepared = preprocess_sample(raw, self.preprocess, self.resample,
                                         self.model.text_vocab)
        except BadSample as err:
            raise ValueError(f"sample {key!r}: {_OBJECT_REPR.sub('the file', str(err))}") from err
        return {**prepared, "key": str(key)}

    def _encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Token rows as the tokenize stage writes them (``pipeline.tokenize.TokenizeActor``)."""
        if not rows:
            return []
        batch = {name: np.stack([np.asarray(r[name]) for r in rows]) for name in rows[0]}
        with torch.no_grad():
            codes = {k: v.cpu().numpy()
                     for k, v in self.model.encode(to_model_inputs(batch)).items()}
        hop = self.model.config.audio.hop  # waveform samples per audio token
        out = []
        for i, row in enumerate(rows):
            image = codes["image"][i].reshape(-1) if row["has_image"] else None
            audio = codes["audio"][i] if row["has_audio"] else None  # (frames[, levels])
            text = codes["text"][i] if row["has_text"] else None
            joint = codes["joint"][i] if "joint" in codes else None
            frames = math.ceil(int(row["audio_len"]) / hop)
            stream = interleave({
                "image": image, "audio": None if audio is None else audio[:frames],
                "text": None if text is None else text[:int(row["text_len"])],
                "joint": joint}, self.layout)
            out.append({
                "key": row["key"], "image_tokens": _ints(image),
                "image_grid": list(codes["image"].shape[1:]) if image is not None else [],
                "audio_tokens": _ints(audio), "text_tokens": _ints(text),
                "joint_tokens": _ints(joint), "interleaved_tokens": stream.tolist(),
                "audio_frames": frames if audio is not None else 0,
                "tokenizer": self.tokenizer_id})
        return out


def _bytes(key: str, name: str, value: Any) -> bytes | None:
    """Member ``name``'s bytes (text may be a str); None for pandas' missing values."""
    if isinstance(value, str) and name == "text":
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    raise ValueError(f"sample {key!r}: {name} must be encoded file bytes, got "
                     f"{type(value).__name__}")


def _ints(codes: np.ndarray | None) -> list[int]:
    return [] if codes is None else np.asarray(codes, np.int32).reshape(-1).tolist()


set_model(TokenizerModel())
