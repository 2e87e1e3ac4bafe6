"""Reading the token dataset back: parquet rows, the manifest, interleaved streams, model codes.

The tokenize stage writes ``OUTPUT/tokens/SPLIT/*.parquet`` and ``OUTPUT/manifest.json``. A
language-model data loader needs only pyarrow (or Ray Data) and the manifest; this module is
the reference reader: it finds the parquet files from any of the three natural paths, splits
``interleaved_tokens`` back into per-modality codes with the manifest's vocabulary layout,
reshapes code columns to the tokenizer's token grids for decoding, and checks that a dataset
agrees with its manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmvq.vocabulary import split_interleaved
from pipeline.tokenize import MANIFEST, TOKENS_DIR

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


def model_codes(rows: Mapping[str, Sequence[Any]],
                shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The code columns of ``rows`` as the tokenizer's ``decode`` input.

    Parameters
    ----------
    rows : column name -> one flattened code list per row (``table.to_pydict()``)
    shapes : the tokenizer's ``token_shapes()``; modalities absent there (joint without
        fusion) or in ``rows``, or with no codes in any row, are left out. A row without codes
        for a modality the others have (a sample lacking it) gets code 0 there, as the model's
        own ``encode`` gives every sample codes; its ``has_*`` says they mean nothing.

    Returns
    -------
    modality -> (B, *shape) long tensor

    Raises
    ------
    ValueError
        If a row's codes do not fill the modality's token shape (e.g. a dataset tokenized by
        another model configuration), naming the column and the row.
    """
    out = {}
    for modality, column in CODE_COLUMNS.items():
        if modality not in shapes or column not in rows or not any(
                len(codes) for codes in rows[column]):
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


def mlflow_dataset(directory: str | Path, name: str, location: str | Path | None = None) -> Any:
    """An ``mlflow.data`` dataset describing the parquet files in ``directory`` (for lineage).

    Its source is ``location`` (default: the directory; a stage passes where its output will be
    committed), its schema the parquet schema, and its digest a hash over file names and bytes,
    so a changed dataset gets a new digest. Files are read in 1 MiB blocks, never whole.
    """
    import hashlib
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    files = sorted(Path(directory).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no parquet files")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    def column_type(t: pa.DataType) -> Any:
        if pa.types.is_list(t):
            return Array(DataType.integer)  # every list column holds int32 codes
        return DataType.integer if pa.types.is_integer(t) else DataType.string

    schema = Schema([ColSpec(column_type(f.type), f.name) for f in pq.read_schema(files[0])])
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": local path, fine
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(location or directory))
    return MetaDataset(source, name=name, digest=digest.hexdigest()[:16], schema=schema)
