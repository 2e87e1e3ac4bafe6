"""The text vocabulary of a preprocessed dataset: fitted by preprocess, read by train.

Preprocess turns captions into ids, so it decides the vocabulary. With ``text_vocab: bytes`` (the
default) the ids are UTF-8 bytes and nothing is written. With ``text_vocab: bpe`` a byte-level BPE
(``mmvq.text_vocab``) is trained on the captions of the *train* split before any caption is
encoded, and saved as ``text_vocab.json`` in the preprocess output, beside the split
directories. Pre-token counts are computed by Ray Data per block and summed on the driver, which
then runs the (deterministic) merge loop: the driver holds the distinct pre-tokens, never the
corpus. Train reads the file back to size the text codec and puts it in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mmvq.config import ConfigError, TokenizerConfig
from mmvq.text_vocab import (
    BYTES,
    VOCAB_FILE,
    BpeVocab,
    TextVocab,
    pretoken_counts,
    text_config_for,
    train_bpe_from_counts,
)

TRAIN_SPLIT = "train"  # the split a BPE is trained on: the one the train stage reads


def train_split_captions(batch: dict[str, np.ndarray], default_split: str,
                         max_text_bytes: int | None = None) -> list[str]:
    """The captions of the train-split samples in a batch of raw webdataset rows.

    A sample's split is its ``json`` metadata's ``split`` (else ``default_split``), as in
    preprocess. Samples whose text or metadata does not decode are left out here; preprocess
    quarantines them, as it does a caption over ``max_text_bytes`` (None: preprocess's default).
    """
    from pipeline.preprocess import MAX_TEXT_BYTES, BadSample, decode_text, member

    max_bytes = MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes

    captions = []
    for i in range(len(batch["__key__"])):
        sample = {name: column[i] for name, column in batch.items()}
        text, metadata = member(sample, ("txt",)), member(sample, ("json",))
        try:
            split = json.loads(metadata).get("split", default_split) if metadata else default_split
            if text is not None and str(split) == TRAIN_SPLIT:
                captions.append(decode_text(text, max_bytes))
        except (BadSample, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
    return captions


def _count_batch(batch: dict[str, np.ndarray], default_split: str,
                 max_text_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Pre-token counts of a batch's train captions, one row per distinct pre-token; the
    caption count rides on the first row (``texts``, zero elsewhere) so that it sums up."""
    captions = train_split_captions(batch, default_split, max_text_bytes)
    counts = pretoken_counts(captions)
    chunks = sorted(counts)
    texts = np.zeros(len(chunks), dtype=np.int64)
    texts[:1] = len(captions)
    return {"chunk": np.array(chunks, dtype=object),
            "count": np.array([counts[c] for c in chunks], dtype=np.int64), "texts": texts}


def fit_text_vocab(paths: list[str], kind: str, vocab_size: int, default_split: str,
                   output_dir: Path, *, filesystem: Any = None, max_text_bytes: int | None = None,
                   allow_compressed: bool = False) -> TextVocab:
    """The vocabulary preprocess encodes captions with; a BPE is trained and saved.

    Parameters
    ----------
    paths : list of str
        The webdataset shards preprocess reads.
    kind : str
        ``bytes`` (returns the byte vocabulary, writes nothing) or ``bpe``.
    vocab_size : int
        Target BPE size (ids, PAD included); a small corpus may give fewer.
    default_split : str
        Split of samples whose metadata names none.
    output_dir : Path
        Where ``text_vocab.json`` is written (the stage's output directory).
    filesystem, max_text_bytes, allow_compressed
        As preprocess reads the shards: the same reader and caps, so a caption preprocess
        would quarantine (or a compressed shard it refuses) never trains the vocabulary.
    """
    if kind == "bytes":
        return BYTES
    import ray.data

    from pipeline.shard_source import ShardDatasource

    source = ShardDatasource(paths, filesystem=filesystem, allow_compressed=allow_compressed)
    raw = ray.data.read_datasource(source, num_cpus=0, concurrency=1).select_columns(
        ["__key__", "txt", "json"])
    counts: Counter[str] = Counter()
    num_texts = 0
    counting = raw.map_batches(_count_batch, batch_format="numpy", num_cpus=0, fn_kwargs={
        "default_split": default_split, "max_text_bytes": max_text_bytes})
    for batch in counting.iter_batches(batch_format="numpy"):
        # A batch joins several blocks' rows, so one pre-token can appear on several rows.
        for chunk, count in zip(batch["chunk"].tolist(), batch["count"].tolist(), strict=True):
            counts[chunk] += count
        num_texts += int(batch["texts"].sum())
    if not counts:
        raise ValueError(f"preprocess.text_vocab is 'bpe' but the {TRAIN_SPLIT!r} split of "
                         f"{len(paths)} shards has no captions to train it on")
    vocab = train_bpe_from_counts(counts, vocab_size, num_texts=num_texts)
    vocab.save(Path(output_dir) / VOCAB_FILE)
    return vocab


def read_data_vocab(data_dir: str | Path) -> TextVocab:
    """The vocabulary of a preprocess output: its ``text_vocab.json``, else bytes."""
    path = Path(data_dir) / VOCAB_FILE
    return BpeVocab.load(path) if path.exists() else BYTES


def model_config_for_data(model: TokenizerConfig, vocab: TextVocab,
                          data_dir: str | Path) -> TokenizerConfig:
    """``model`` with its text codec sized for the data's vocabulary.

    The data decides the vocabulary (its ids were made with it). A model config that pins a
    different BPE (``text.vocab: bpe`` with another ``vocab_size`` or ``vocab_sha256``) is an
    error rather than silently replaced; the default byte settings simply take the data's.
    """
    text = model.text
    if text.vocab == "bpe" and (text.vocab_size, text.vocab_sha256) != (
            vocab.vocab_size, vocab.sha256):
        raise ConfigError(
            f"train.model.text pins a BPE vocabulary (vocab_size {text.vocab_size}, sha256 "
            f"{text.vocab_sha256}) but the data in {data_dir} was encoded with "
            f"{vocab.kind} (vocab_size {vocab.vocab_size}, sha256 {vocab.sha256})")
    return dataclasses.replace(model, text=text_config_for(text, vocab))


def describe(vocab: TextVocab) -> dict[str, Any]:
    """Kind, size and hash of a vocabulary, for stage summaries and manifests."""
    return {"kind": vocab.kind, "vocab_size": vocab.vocab_size, "sha256": vocab.sha256}


def with_data_vocab(model: TokenizerConfig,
                    data_dir: str | Path) -> tuple[TokenizerConfig, TextVocab]:
    """The data's vocabulary (:func:`read_data_vocab`) and ``model`` sized for it
    (:func:`model_config_for_data`): what the train stage builds its tokenizer from."""
    vocab = read_data_vocab(data_dir)
    return model_config_for_data(model, vocab, data_dir), vocab
