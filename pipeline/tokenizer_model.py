"""The registered tokenizer's pyfunc model, logged as code: a registry entry holds no pickle.

MLflow's models-from-code: the register stage logs this file (``python_model=<this file>``);
MLflow executes it when a version is loaded and serves the model that
:func:`mlflow.models.set_model` names at the bottom. Everything else in the version is data:
the tokenizer directory (``config.json`` + ``model.safetensors``, read by
:meth:`mmvq.MultimodalTokenizer.load`, which never unpickles) as the ``tokenizer`` artifact,
and the ``mmvq`` and ``pipeline`` packages as ``code_paths``, which MLflow puts first on
``sys.path``. So ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` works in a process that
has no checkout of this repository, with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

It imports as little as it can: the contracts' pure sample function (so predict sees exactly
what training saw) and the token dataset's row encoder (so its rows are the token dataset's rows
for the same samples); not Ray and no stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from pipeline.formats.registry import ARTIFACT, INPUT_COLUMNS, OUTPUT_COLUMNS
from pipeline.formats.samples import (
    BadSample,
    Resamplers,
    SampleSpec,
    preprocess_sample,
    stack_rows,
)
from pipeline.formats.tokens import TokenEncoder

# PIL and libsndfile put the stream's repr in their messages: meaningless to a caller.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class TokenizerModel(PythonModel):
    """A DataFrame of raw samples in, one token row per sample out.

    Input columns (each optional per row; a row needs at least one modality): ``key`` str,
    ``image`` encoded image bytes (PNG, JPEG, WebP), ``audio`` encoded audio bytes (WAV, FLAC,
    OGG, MP3), ``text`` str. Output columns: ``OUTPUT_COLUMNS``, code columns as int lists.
    """

    def load_context(self, context: Any) -> None:
        # The tokenize stage's row encoder, so predict's rows are the token dataset's rows.
        self.encoder = TokenEncoder(context.artifacts[ARTIFACT])
        self.model = self.encoder.model
        # The sample spec the model was trained on: crop, rate, clip and text length.
        self.preprocess = SampleSpec.for_model(self.model.config)
        self.resample = Resamplers(self.preprocess.sample_rate)

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
        """Token rows as the tokenize stage writes them, in ``OUTPUT_COLUMNS``."""
        if not rows:
            return []
        table = self.encoder(stack_rows(rows)).select(list(OUTPUT_COLUMNS))
        return table.to_pylist()


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


set_model(TokenizerModel())
