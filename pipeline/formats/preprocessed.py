"""The preprocessed dataset and its data contract: what preprocess produced, read by train.

Layout of a preprocess output: ``SPLIT/*.parquet`` (DESIGN.md's preprocessed columns),
``quarantine.parquet``, ``text_vocab.json`` (a BPE only; bytes need no file) and
:data:`CONTRACT_FILE`, the *data contract*: image size, sample rate, clip length, text length
and the text vocabulary the rows were made with. The model must take exactly these shapes, so
train derives them from here (:func:`derive_model_shapes` at plan time, from the upstream
preprocess config or this file) and checks them again before any worker starts
(:func:`model_config_for_data`). A conflict names both keys instead of surfacing as a shape
error inside a Ray Train worker on the first batch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmvq.config import ConfigError, TokenizerConfig
from mmvq.text_vocab import BYTES, VOCAB_FILE, BpeVocab, TextVocab, text_config_for

CONTRACT_FILE = "data.json"
TRAIN_SPLIT = "train"  # the split a BPE is trained on: the one the train stage reads
# Each shape of the contract (preprocess's key) -> the model key that must equal it, as a
# path under the train config (``train.model.image.image_size``).
MODEL_SHAPES: dict[str, tuple[str, str]] = {
    "image_size": ("image", "image_size"),
    "sample_rate": ("audio", "sample_rate"),
    "audio_samples": ("audio", "num_samples"),
    "text_max_len": ("text", "max_len"),
}


def shapes_of(spec: Any) -> dict[str, int]:
    """The contract's shapes of a sample spec (``preprocess``'s config or a ``SampleSpec``)."""
    return {name: int(getattr(spec, name)) for name in MODEL_SHAPES}


def describe(vocab: TextVocab) -> dict[str, Any]:
    """Kind, size and hash of a vocabulary, for the contract, stage summaries and manifests."""
    return {"kind": vocab.kind, "vocab_size": vocab.vocab_size, "sha256": vocab.sha256}


def write_contract(out_dir: str | Path, spec: Any, vocab: TextVocab) -> dict[str, Any]:
    """Record what preprocess produced beside its output; returns the record."""
    record = {**shapes_of(spec), "text_vocab": describe(vocab)}
    (Path(out_dir) / CONTRACT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def read_contract(data_dir: str | Path) -> dict[str, Any]:
    """The data contract of a preprocess output.

    Raises
    ------
    ConfigError
        If the directory has none (not a preprocess output, or one older than the contract).
    """
    path = Path(data_dir) / CONTRACT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: no readable data contract ({err}); the train stage reads "
                          "the output of the preprocess stage (rerun it)") from err
    missing = [name for name in MODEL_SHAPES if not isinstance(record.get(name), int)]
    if missing:
        raise ConfigError(f"{path}: data contract lacks {missing}")
    return record


def read_data_vocab(data_dir: str | Path) -> TextVocab:
    """The vocabulary of a preprocess output: its ``text_vocab.json``, else bytes."""
    path = Path(data_dir) / VOCAB_FILE
    return BpeVocab.load(path) if path.exists() else BYTES


def derive_model_shapes(train: Mapping[str, Any], shapes: Mapping[str, int],
                        where: str, consumer: str = "train") -> dict[str, Any]:
    """The raw train config (YAML data) with the model's input shapes taken from the data.

    A shape the user left unset is set to the data's; one set to another value is an error
    naming both keys, so a mismatch fails when the plan is made.

    Parameters
    ----------
    train : the train stage's config as written (``stages.train.config``).
    shapes : the contract's shapes (:func:`shapes_of`, or :func:`read_contract`).
    where : what produced the shapes, for the message (``preprocess`` or a directory).
    consumer : the train entry's name, for the message.
    """
    out = {**train}
    model = dict(out.get("model") or {})
    for name, (part, key) in MODEL_SHAPES.items():
        section = dict(model.get(part) or {})
        if key in section and section[key] != shapes[name]:
            raise ConfigError(
                f"{consumer}.model.{part}.{key} is {section[key]!r} but {where}.{name} is "
                f"{shapes[name]!r}: the model must take the data as preprocess made it; remove "
                f"{consumer}.model.{part}.{key} (it follows the data) or set both to one value")
        section[key] = shapes[name]
        model[part] = section
    out["model"] = model
    return out


def model_config_for_data(model: TokenizerConfig, data_dir: str | Path,
                          ) -> tuple[TokenizerConfig, TextVocab]:
    """``model`` checked against the data's contract and sized for its vocabulary.

    The data decides the shapes and the vocabulary (its rows were made with them). A shape that
    differs, or a model config that pins a different BPE (``text.vocab: bpe`` with another
    ``vocab_size`` or ``vocab_sha256``), is an error naming both; the default byte settings
    simply take the data's vocabulary.
    """
    contract = read_contract(data_dir)
    for name, (part, key) in MODEL_SHAPES.items():
        value = getattr(getattr(model, part), key)
        if value != contract[name]:
            raise ConfigError(f"train.model.{part}.{key} is {value!r} but the data in {data_dir} "
                              f"was preprocessed with {name} {contract[name]!r} "
                              f"({CONTRACT_FILE})")
    vocab = read_data_vocab(data_dir)
    text = model.text
    if text.vocab == "bpe" and (text.vocab_size, text.vocab_sha256) != (
            vocab.vocab_size, vocab.sha256):
        raise ConfigError(
            f"train.model.text pins a BPE vocabulary (vocab_size {text.vocab_size}, sha256 "
            f"{text.vocab_sha256}) but the data in {data_dir} was encoded with "
            f"{vocab.kind} (vocab_size {vocab.vocab_size}, sha256 {vocab.sha256})")
    return dataclasses.replace(model, text=text_config_for(text, vocab)), vocab


def read_split(directory: str | Path, columns: Sequence[str]) -> dict[str, Any]:
    """A split's ``columns`` as numpy arrays, whole, in one process and without Ray (for
    benchmarks and probes over a split that fits in memory; the stages stream instead)."""
    import pyarrow.parquet as pq

    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {directory}")
    return read_columns(pq.read_table([str(f) for f in files], columns=list(columns)))


def read_columns(table: Any) -> dict[str, Any]:
    """A pyarrow table's columns as numpy. Ray Data's tensor columns are stored as lists whose
    field metadata gives each row's shape; they come back as (N, *shape) arrays."""
    import numpy as np
    import pyarrow as pa

    rows = {}
    for field, column in zip(table.schema, table.columns, strict=True):
        array = column.combine_chunks()
        if isinstance(field.type, pa.ExtensionType):  # Ray imported: its tensor type, known
            shape, array = tuple(field.type.shape), array.storage
        elif b"ARROW:extension:metadata" in (field.metadata or {}):  # the same, unregistered
            shape = tuple(json.loads(field.metadata[b"ARROW:extension:metadata"]))
        else:
            rows[field.name] = array.to_numpy(zero_copy_only=False)
            continue
        rows[field.name] = np.ascontiguousarray(array.flatten().to_numpy().reshape(-1, *shape))
    return rows
