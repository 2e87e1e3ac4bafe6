"""The token dataset: its directories, schema, row encoder, manifest, reader and checker.

The tokenize stage writes ``OUTPUT/tokens/SPLIT/*.parquet`` (:data:`TOKEN_SCHEMA`, one row per
sample made by :class:`TokenEncoder`) and ``OUTPUT/manifest.json`` (:func:`build_manifest`).
``mmvq encode`` and the registered model make their rows with the same encoder, so the three
agree row for row. A language-model data loader needs only pyarrow (or Ray Data) and the
manifest; the reader here finds the parquet files from any of the three natural paths, splits
``interleaved_tokens`` back into per-modality codes with the manifest's vocabulary layout,
reshapes code columns to the tokenizer's token grids for decoding, and checks that a dataset
agrees with its manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmvq.vocabulary import interleave, split_interleaved

if TYPE_CHECKING:
    import torch

    from mmvq.config import SpeedConfig

TOKENS_DIR = "tokens"
MANIFEST = "manifest.json"
WEBDATASET_DIR = "tokens-wds"
# Explicit types: Ray would otherwise infer object columns from Python lists.
_CODES = pa.list_(pa.int32())
TOKEN_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("image_tokens", _CODES),
    ("image_grid", _CODES), ("audio_tokens", _CODES), ("audio_frames", pa.int32()),
    ("audio_levels", pa.int32()),
    ("text_tokens", _CODES), ("joint_tokens", _CODES), ("interleaved_tokens", _CODES),
    ("tokenizer", pa.string()),
    ("source_shard", pa.string())])


def tokenizer_id(weights_sha256: str) -> str:
    """The id every token row names its tokenizer by: ``local:`` + the weights' sha256 prefix.

    Tokenize runs before register, so no registry version exists yet; each registered version
    carries this id as its ``tokenizer_id`` tag (pipeline.register)."""
    return f"local:{weights_sha256[:16]}"


class TokenEncoder:
    """A loaded tokenizer that turns batches of preprocessed rows into token rows.

    The tokenize stage runs it as its Ray Data actor; ``mmvq encode`` and the registered model
    call it in process. Rows carry ``key``, ``split`` and ``source_shard`` when the batch has
    them (empty strings otherwise).

    ``speed`` (the tokenize stage's ``speed`` section) turns on the fast path of
    :func:`mmvq.speed.apply_speed` for the loaded model, as training does: bf16 autocast, NHWC
    and compile of its nets, TF32 and larger search blocks. Encoding then needs no autocast of
    its own. On a device type the config leaves out (the CPU by default), and with None, the
    model runs as loaded: plain fp32 eager.
    """

    def __init__(self, model_dir: str, use_gpu: bool = False, audio_levels: int | None = None,
                 speed: SpeedConfig | None = None, text_tokens: str = "ids",
                 text_vocab: str | None = None) -> None:
        import torch

        from mmvq.speed import apply_speed
        from mmvq.tokenizer import MultimodalTokenizer

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = MultimodalTokenizer.load(model_dir, map_location=self.device).eval()
        self.text_vocab = text_token_vocab(self.model, text_tokens, text_vocab)
        self.layout = token_layout(self.model, self.text_vocab)
        self.tokenizer_id = tokenizer_id(self.model.weights_hash())
        self.hop = self.model.config.audio.hop  # waveform samples per audio token
        self.audio_levels = audio_levels  # residual audio levels to keep (None: all)
        if speed is not None:
            apply_speed(speed, self.device, self.model)  # inference: no optimizers

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        from mmvq.batch import to_model_inputs

        inputs = to_model_inputs(dict(batch), self.device)
        with torch.no_grad():
            codes = {k: v.cpu().numpy() for k, v in
                     self.model.encode(inputs, audio_levels=self.audio_levels).items()}
        text = None if self.text_vocab is None else caption_ids(batch, self.text_vocab)
        return pa.table(token_rows(codes, batch, self.layout, self.tokenizer_id, self.hop, text),
                        schema=TOKEN_SCHEMA)


# Text tokens: "ids" (the default) are the caption's ids in a text vocabulary, exact and whole;
# "codes" are the text codec's VQ codes, one per text position (lossy: a learned re-encoding of
# ids that were already discrete, kept for experiments).
TEXT_TOKENS = ("ids", "codes")


def text_token_vocab(model: Any, text_tokens: str = "ids",
                     text_vocab: str | None = None) -> Any:
    """The vocabulary whose ids the text tokens are, or None for ``codes``.

    ``text_vocab`` is a vocabulary file (a Hugging Face ``tokenizer.json``, so that the tokens
    match the language model's own, or an mmvq BPE ``text_vocab.json``); None takes the
    tokenizer's own text vocabulary (UTF-8 bytes, or the BPE it was trained with).

    Raises
    ------
    ValueError
        For another ``text_tokens``, ``text_vocab`` with ``codes``, or a vocabulary file that
        does not load or does not give every string back.
    """
    from mmvq.text_vocab import check_lossless, load_text_vocab

    if text_tokens not in TEXT_TOKENS:
        raise ValueError(f"text_tokens must be one of {TEXT_TOKENS}, got {text_tokens!r}")
    if text_tokens == "codes":
        if text_vocab:
            raise ValueError("text_vocab names the vocabulary of text ids; with "
                             "text_tokens: codes the text tokens are codec codes")
        return None
    vocab = model.text_vocab if not text_vocab else load_text_vocab(text_vocab)
    check_lossless(vocab, str(text_vocab or "the tokenizer's text vocabulary"))
    return vocab


def token_layout(model: Any, text_vocab: Any) -> dict[str, Any]:
    """The unified vocabulary of a token dataset: the model's codebooks, with the text range
    sized to ``text_vocab`` when text tokens are its ids, and ``text_tokens`` saying which."""
    from mmvq.vocabulary import vocabulary_layout

    if text_vocab is None:
        return {**model.vocabulary(), "text_tokens": {"kind": "codes"}}
    sizes = {**model.codebook_sizes(), "text": int(text_vocab.vocab_size)}
    return {**vocabulary_layout(sizes, model.codebook_levels()),
            "text_tokens": {"kind": "ids", "vocab": text_vocab.kind,
                            "vocab_size": int(text_vocab.vocab_size),
                            "sha256": text_vocab.sha256}}


def caption_ids(batch: Mapping[str, Any], vocab: Any) -> list[list[int]]:
    """Each row's whole caption (``text``, as written) as ids of ``vocab``; [] without text.

    Raises
    ------
    KeyError
        If the batch has no ``text`` column (preprocessed before captions were kept).
    ValueError
        Naming the row's key if the vocabulary does not give its caption back.
    """
    if "text" not in batch:
        raise KeyError("the preprocessed rows have no 'text' column (written before text "
                       "tokens kept the caption): rerun preprocess, or set text_tokens: codes")
    out = []
    for i, (text, has_text) in enumerate(zip(batch["text"], batch["has_text"], strict=True)):
        ids = vocab.encode(str(text)) if has_text else []
        if has_text and vocab.decode(ids) != str(text):
            key = batch["key"][i] if "key" in batch else i
            raise ValueError(f"sample {key}: the text vocabulary ({vocab.kind}) does not give "
                             f"its caption back exactly")
        out.append(ids)
    return out


def token_rows(codes: Mapping[str, np.ndarray], batch: Mapping[str, Any],
               layout: Mapping[str, Any], tokenizer: str, hop: int,
               text_ids: Sequence[Sequence[int]] | None = None) -> dict[str, list]:
    """The token dataset's columns for one encoded batch.

    Parameters
    ----------
    codes : the tokenizer's ``encode`` output as numpy (``image`` (B, h, w), ``audio``
        (B, frames[, levels]), ``text`` (B, L), optionally ``joint`` (B, Q)).
    batch : the preprocessed rows encoded (``has_*``, ``audio_len``, ``text_len``, ...).
    layout : the tokenizer's unified vocabulary layout (``interleaved_tokens``).
    tokenizer : the id every row names (:func:`tokenizer_id`).
    hop : waveform samples per audio frame.
    text_ids : each row's caption ids (:func:`caption_ids`), the text tokens when given;
        None: the text codec's codes, cut to the row's ``text_len``.
    """
    # Residual audio codes are (B, frames, levels); one-level codes (B, frames).
    levels = codes["audio"].shape[2] if codes["audio"].ndim == 3 else 1
    n = len(batch["has_image"])
    rows: dict[str, list] = {name: [] for name in TOKEN_SCHEMA.names}
    for i in range(n):
        image = codes["image"][i].reshape(-1) if batch["has_image"][i] else None
        audio = codes["audio"][i] if batch["has_audio"][i] else None
        # Text ids are the caption's whole; codec codes fill every position, and the stream
        # takes those of the real length.
        text = text_run = None
        if batch["has_text"][i] and text_ids is not None:
            text = text_run = np.asarray(text_ids[i], np.int64)
        elif batch["has_text"][i]:
            text = codes["text"][i]
            text_run = text[:int(batch["text_len"][i])]
        joint = codes["joint"][i] if "joint" in codes else None
        frames = math.ceil(int(batch["audio_len"][i]) / hop)
        stream = interleave({
            "image": image, "audio": None if audio is None else audio[:frames],
            "text": text_run,
            "joint": joint}, layout)
        rows["key"].append(str(batch["key"][i]) if "key" in batch else "")
        rows["split"].append(str(batch["split"][i]) if "split" in batch else "")
        rows["image_tokens"].append(_as_list(image))
        rows["image_grid"].append(list(codes["image"].shape[1:]) if image is not None else [])
        rows["audio_tokens"].append(_as_list(audio))
        rows["audio_frames"].append(frames if audio is not None else 0)
        rows["audio_levels"].append(levels)
        rows["text_tokens"].append(_as_list(text))
        rows["joint_tokens"].append(_as_list(joint))
        rows["interleaved_tokens"].append(stream.tolist())
        rows["tokenizer"].append(tokenizer)
        rows["source_shard"].append(str(batch["source_shard"][i]) if "source_shard" in batch
                                    else "")
    return rows


def _as_list(codes: np.ndarray | None) -> list[int]:
    return [] if codes is None else np.asarray(codes, np.int32).reshape(-1).tolist()


# Code columns per modality, as tokenize writes them (flattened row-major).
CODE_COLUMNS = {"image": "image_tokens", "audio": "audio_tokens", "text": "text_tokens",
                "joint": "joint_tokens"}


def dataset_root(path: str | Path) -> Path:
    """The tokenize output directory (the one holding ``manifest.json``) for ``path``.

    ``path`` may be that directory, its ``tokens/`` directory or one split directory below it.
    """
    path = Path(path).resolve()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / MANIFEST).is_file() and (candidate / TOKENS_DIR).is_dir():
            return candidate
    raise FileNotFoundError(f"{path}: not a token dataset (no {MANIFEST} next to a "
                            f"{TOKENS_DIR}/ directory here or in the two parents)")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the token dataset at ``path`` (see :func:`dataset_root`)."""
    file = dataset_root(path) / MANIFEST
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err


def read_token_dataset(path: str | Path, split: str | None = None,
                       columns: Sequence[str] | None = None) -> pa.Table:
    """The token rows at ``path`` as one Arrow table (one row per sample).

    Parameters
    ----------
    path : the tokenize output directory, its ``tokens/`` directory, or a split directory
    split : read only this split (ignored when ``path`` already is a split directory);
        None reads every split
    columns : column subset; None reads all of them

    Raises
    ------
    FileNotFoundError
        If the split does not exist; the message lists the splits that do.
    """
    path = Path(path).resolve()
    root = dataset_root(path)
    if path.parent.name == TOKENS_DIR and path.parent.parent == root:
        directories = [path]  # a split directory
    else:
        available = sorted(p.name for p in (root / TOKENS_DIR).iterdir() if p.is_dir())
        if split is not None and split not in available:
            raise FileNotFoundError(f"{root / TOKENS_DIR}: no split {split!r} "
                                    f"(has {available})")
        directories = [root / TOKENS_DIR / s for s in ([split] if split else available)]
    tables = [pq.ParquetDataset(str(d)).read(columns=list(columns) if columns else None)
              for d in directories]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def split_interleaved_column(streams: pa.ChunkedArray | Sequence[Sequence[int]],
                             layout: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """Split every ``interleaved_tokens`` stream into per-modality codes (offsets removed).

    The text run holds only the real (unpadded) text positions and the audio run only the
    frames covering real audio, so its lengths give ``text_len`` and ``audio_frames``.
    """
    values = streams.to_pylist() if isinstance(streams, pa.ChunkedArray | pa.Array) else streams
    return [split_interleaved(np.asarray(s, np.int64), layout) for s in values]


def model_codes(rows: Mapping[str, Sequence[Any]], shapes: Mapping[str, Sequence[int]],
                layout: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The code columns of ``rows`` as the tokenizer's ``decode`` input.

    Parameters
    ----------
    rows : column name -> one flattened code list per row (``table.to_pydict()``)
    shapes : the tokenizer's ``token_shapes()``; modalities absent there (joint without
        fusion) or in ``rows``, or with no codes in any row, are left out. A row without codes
        for a modality the others have (a sample lacking it) gets code 0 there, as the model's
        own ``encode`` gives every sample codes; its ``has_*`` says they mean nothing.
    layout : the rows' vocabulary (the manifest's); when its ``text_tokens`` are caption ids,
        not codec codes, text is left out (``text_vocab.decode`` reads those directly)

    Returns
    -------
    modality -> (B, *shape) long tensor

    Raises
    ------
    ValueError
        If a row's codes do not fill the modality's token shape (e.g. a dataset tokenized by
        another model configuration), naming the column and the row.
    """
    import torch

    text_ids = (layout or {}).get("text_tokens", {}).get("kind") == "ids"
    out = {}
    for modality, column in CODE_COLUMNS.items():
        if modality not in shapes or column not in rows or not any(
                len(codes) for codes in rows[column]) or (modality == "text" and text_ids):
            continue
        shape = tuple(shapes[modality])
        if modality == "audio" and "audio_levels" in rows:
            shape = _audio_shape(shape[0], rows)
        size = int(np.prod(shape))
        arrays = []
        for i, codes in enumerate(rows[column]):
            array = np.asarray(codes, np.int64)
            if array.size == 0:
                array = np.zeros(size, np.int64)  # modality absent from this sample
            if array.size != size:
                raise ValueError(f"{column} of row {i} has {array.size} codes; the tokenizer "
                                 f"expects {size} (token shape {list(shape)})")
            arrays.append(array.reshape(shape))  # flattened row-major -> token grid
        out[modality] = torch.from_numpy(np.stack(arrays)) if arrays else \
            torch.zeros((0, *shape), dtype=torch.long)
    return out


def _audio_shape(frames: int, rows: Mapping[str, Sequence[Any]]) -> tuple[int, ...]:
    """(frames,) or (frames, levels): residual audio rows keep ``audio_levels`` levels each,
    possibly fewer than the model has (a lower bitrate chosen at tokenize time)."""
    levels = {int(n) for n, codes in zip(rows["audio_levels"], rows["audio_tokens"], strict=True)
              if len(codes)}
    if len(levels) > 1:
        raise ValueError(f"audio_levels differ between rows ({sorted(levels)}); decode rows "
                         "tokenized with one setting at a time")
    n = levels.pop() if levels else 1
    return (frames, n) if n > 1 else (frames,)


def check_token_dataset(path: str | Path) -> dict[str, int]:
    """Check that the token dataset at ``path`` agrees with its manifest; returns row counts.

    Checked: rows per split equal ``counts``; keys are unique; every code lies in its
    modality's codebook; every interleaved stream lies in the unified vocabulary and splits back
    into the row's own code columns; the splits and source shards match.

    Raises
    ------
    ValueError
        Naming the split, column and (where it applies) key of the first disagreement.
    """
    root = dataset_root(path)
    manifest = read_manifest(root)
    layout = manifest["vocabulary"]
    sizes = layout["codebook_sizes"]
    splits = sorted(p.name for p in (root / TOKENS_DIR).iterdir() if p.is_dir())
    if splits != sorted(manifest["splits"]):
        raise ValueError(f"{root}: splits on disk {splits} != manifest {manifest['splits']}")
    counts, keys, shards = {}, set(), set()
    for split in splits:
        columns = read_token_dataset(root, split).to_pydict()
        counts[split] = len(columns["key"])
        if counts[split] != manifest["counts"][split]:
            raise ValueError(f"{root}: split {split} has {counts[split]} rows, manifest says "
                             f"{manifest['counts'][split]}")
        duplicates = keys & set(columns["key"])
        if duplicates or len(set(columns["key"])) != counts[split]:
            raise ValueError(f"{root}: split {split}: duplicate keys, e.g. "
                             f"{sorted(duplicates)[:3] or columns['key'][:1]}")
        keys |= set(columns["key"])
        shards |= set(columns["source_shard"])
        _check_rows(split, columns, layout, sizes)
    if sorted(shards) != sorted(manifest["source_shards"]):
        raise ValueError(f"{root}: source shards in the rows differ from the manifest's")
    return counts


def _check_rows(split: str, columns: Mapping[str, list], layout: Mapping[str, Any],
                sizes: Mapping[str, int]) -> None:
    for i, key in enumerate(columns["key"]):
        for modality, column in CODE_COLUMNS.items():
            codes = np.asarray(columns[column][i], np.int64)
            if codes.size and (modality not in sizes or codes.min() < 0
                               or codes.max() >= sizes[modality]):
                raise ValueError(f"split {split}, key {key}: {column} outside "
                                 f"[0, {sizes.get(modality, 0)})")
        stream = np.asarray(columns["interleaved_tokens"][i], np.int64)
        if stream.size and (stream.min() < 0 or stream.max() >= layout["vocab_size"]):
            raise ValueError(f"split {split}, key {key}: interleaved_tokens outside "
                             f"[0, {layout['vocab_size']})")
        for modality, codes in split_interleaved(stream, layout).items():
            # The stream holds the real prefix (text length, audio frames) of each column.
            full = np.asarray(columns[CODE_COLUMNS[modality]][i], np.int64)
            if not np.array_equal(full[:codes.size], codes):
                raise ValueError(f"split {split}, key {key}: interleaved {modality} run differs "
                                 f"from {CODE_COLUMNS[modality]}")


def build_manifest(model: Any, counts: Mapping[str, int], audio_levels: int,
                   tokenizer: Mapping[str, Any], shard_counts: Mapping[str, int],
                   data_dir: str | Path, webdataset: bool = False,
                   layout: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The token dataset's ``manifest.json``: counts, the unified vocabulary layout, token
    shapes, the tokenizer (id, weights hash, source), lineage and what each column holds.

    Parameters
    ----------
    model : the ``MultimodalTokenizer`` that wrote the rows.
    counts : rows per split; ``shard_counts`` rows per source shard.
    audio_levels : residual levels kept per audio frame.
    tokenizer : ``id``, ``weights_sha256``, ``source`` and ``model_version`` of the tokenizer.
    layout : the rows' unified vocabulary (:func:`token_layout`); None: the model's own.
    """
    splits = sorted(counts)
    layout = dict(layout or model.vocabulary())
    shapes = {k: list(v) for k, v in model.token_shapes().items()}
    if layout.get("text_tokens", {}).get("kind") == "ids":
        shapes.pop("text")  # a caption's ids are as many as it needs
    return {
        "counts": counts, "total": sum(counts.values()), "splits": splits,
        "vocabulary": layout, "token_shapes": shapes,
        "audio_hop_samples": model.config.audio.hop,
        "audio_levels": audio_levels,  # per frame in audio_tokens (<= token_shapes' levels)
        # Tokenize runs before the register stage, so the registered model version is not
        # known here: rows name the weights (local:<sha256 prefix>) and each registered
        # version carries that id as its tokenizer_id tag (pipeline.register).
        "tokenizer": dict(tokenizer),
        "codebook_hash": tokenizer["weights_sha256"], "source_shards": sorted(shard_counts),
        "source_shard_counts": dict(shard_counts), "source_data": str(data_dir),
        "files": {"parquet": f"{TOKENS_DIR}/SPLIT/*.parquet",
                  "webdataset": f"{WEBDATASET_DIR}/SPLIT/shard-*.tar (KEY.json per row)"
                  if webdataset else None},
        "columns": {"image_tokens": "row-major image code grid (image_grid = [h, w])",
                    "audio_tokens": "all frames of the fixed window, frame-major "
                                    "(frames x audio_levels); the first audio_frames frames "
                                    "cover the real audio",
                    "audio_levels": "residual levels per audio frame (1 unless the audio "
                                    "quantizer is rvq); vocabulary.level_offsets gives each "
                                    "level's id range",
                    "text_tokens": "the caption's ids in vocabulary.text_tokens' text "
                                   "vocabulary, whole and exact (text_tokens kind 'ids'), or "
                                   "one codec code per text position, padding included "
                                   "('codes')",
                    "joint_tokens": "fusion tokens over all modalities (empty without fusion)",
                    "interleaved_tokens": "unified vocabulary: <boi> image <eoi> <boa> audio "
                                          "(real frames) <eoa> <bot> text (real length) <eot> "
                                          "<boj> joint <eoj>; mmvq.vocabulary."
                                          "split_interleaved reads one stream back, "
                                          "pipeline.formats.tokens.split_interleaved_column the "
                                          "column"},
    }
