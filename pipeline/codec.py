"""Files <-> tokens with a trained tokenizer: the ``mmvq encode`` / ``mmvq decode`` commands.

``encode`` reads a file or a folder of images, audio and text, groups files by stem into samples
(``cat.png``, ``cat.wav`` and ``cat.txt`` are one sample, as in a webdataset shard), prepares
them with the preprocess stage's own pure functions (so the model sees exactly what training
saw: EXIF-upright RGB center crop, mono resampled clip of fixed length, byte ids) and encodes
them with the tokenize stage's actor code, so the rows equal the token dataset's rows for the
same inputs. Output is JSON or parquet.

``decode`` reads tokens (that JSON or parquet, or a token dataset written by tokenize) and
writes ``KEY.png``, ``KEY.wav`` and ``KEY.txt`` per sample.

The model is a tokenizer directory (``config.json`` + ``model.safetensors``), a committed train
output (its ``tokenizer/`` subdirectory), or ``models:/NAME/VERSION`` from an MLflow registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
from PIL import Image

from pipeline.preprocess import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    BadSample,
    PreprocessConfig,
    Resamplers,
    preprocess_sample,
)
from pipeline.tokenize import MANIFEST, TOKEN_SCHEMA, TOKENS_DIR, TokenizeActor
from pipeline.tokens import model_codes, read_token_dataset

# Where a registered model (pipeline.register) keeps the tokenizer inside its artifacts.
REGISTERED_TOKENIZER = "artifacts/tokenizer"
# Parquet schema metadata key holding the vocabulary layout, so a parquet file from encode is
# self-describing like a token dataset with its manifest.
LAYOUT_KEY = b"mmvq.vocabulary"
EXTENSIONS = {**{e: "image" for e in IMAGE_EXTENSIONS}, **{e: "audio" for e in AUDIO_EXTENSIONS},
              **{e: "text" for e in TEXT_EXTENSIONS}}


# ----------------------------------------------------------------------------- the model

def resolve_model(spec: str, tracking_uri: str | None = None) -> Path:
    """The local tokenizer directory for ``spec``.

    Parameters
    ----------
    spec : a tokenizer directory, a committed train output (holding ``tokenizer/``), or
        ``models:/NAME/VERSION`` (downloaded from the MLflow registry)
    tracking_uri : the registry's tracking server for ``models:/``; default
        ``MLFLOW_TRACKING_URI``
    """
    if spec.startswith("models:/"):
        import mlflow.artifacts

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(f"{spec}: a registered model needs --tracking-uri or "
                             "MLFLOW_TRACKING_URI")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=uri,
                                                         registry_uri=uri))
        if not (local / REGISTERED_TOKENIZER / "config.json").is_file():
            raise ValueError(f"{spec}: not an mmvq tokenizer model (no {REGISTERED_TOKENIZER}/"
                             "config.json in its artifacts)")
        return local / REGISTERED_TOKENIZER
    path = Path(spec)
    for candidate in (path, path / "tokenizer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"{spec}: not a tokenizer (expected a directory with config.json and "
                     "model.safetensors, a train output with tokenizer/, or models:/NAME/VERSION)")


class Codec:
    """A loaded tokenizer plus the tokenize stage's row encoder around it.

    Parameters
    ----------
    model_dir : a tokenizer directory (see :func:`resolve_model`)
    """

    def __init__(self, model_dir: str | Path) -> None:
        from mmvq import MultimodalTokenizer

        model = MultimodalTokenizer.load(model_dir)
        self.layout = model.vocabulary()
        self.tokenizer_id = f"local:{model.weights_hash()[:16]}"  # as tokenize writes it
        # The tokenize stage's own actor code: encode and the token dataset give equal rows.
        self.encoder = TokenizeActor(str(model_dir), self.layout, self.tokenizer_id, False)
        self.model = self.encoder.model
        cfg = self.model.config
        self.preprocess = PreprocessConfig(
            image_size=cfg.image.image_size, sample_rate=cfg.audio.sample_rate,
            audio_samples=cfg.audio.num_samples, text_max_len=cfg.text.max_len, required=())
        self.resample = Resamplers(cfg.audio.sample_rate)

    def encode(self, samples: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Token rows (the token dataset schema) for raw samples.

        Parameters
        ----------
        samples : dicts with ``key``, optional ``source`` and any of ``image`` / ``audio``
            (encoded file bytes: PNG, JPEG, WAV, FLAC, ...) and ``text`` (str or UTF-8 bytes)

        Raises
        ------
        ValueError
            If a sample has no modality or a file does not decode, naming the key.
        """
        rows = []
        for sample in samples:
            raw = {"png": sample.get("image"), "wav": sample.get("audio"),
                   "txt": _text_bytes(sample.get("text"))}
            raw = {ext: bytes(v) for ext, v in raw.items() if v is not None}
            if not raw:
                raise ValueError(f"sample {sample['key']!r}: no image, audio or text")
            try:
                row = preprocess_sample(raw, self.preprocess, self.resample,
                                        self.model.text_vocab)
            except BadSample as err:
                raise ValueError(f"sample {sample['key']!r} ({sample.get('source', '')}): "
                                 f"{err}") from err
            rows.append({**row, "key": str(sample["key"]), "split": "",
                         "source_shard": str(sample.get("source", ""))})
        if not rows:
            return TOKEN_SCHEMA.empty_table()
        batch = {name: np.stack([np.asarray(r[name]) for r in rows]) for name in rows[0]}
        return self.encoder(batch)

    def decode(self, rows: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """Per row: ``key`` and the decoded ``image`` (H, W, 3) uint8, ``audio`` float32 clip
        (the real frames only) and ``text`` str, for the modalities the row has codes for.

        Raises
        ------
        ValueError
            If the rows were written by another tokenizer (``tokenizer`` column differs).
        """
        ids = set(rows.get("tokenizer", [])) - {self.tokenizer_id}
        if ids:
            raise ValueError(f"tokens were written by tokenizer {sorted(ids)}, this model is "
                             f"{self.tokenizer_id}: decode them with the model that wrote them")
        from mmvq.text_vocab import decode_ids
        from mmvq.vocabulary import split_interleaved

        n = len(rows["key"])
        out: list[dict[str, Any]] = [{"key": str(k)} for k in rows["key"]]
        shapes = self.model.token_shapes()
        hop = self.model.config.audio.hop
        for modality in ("image", "audio", "text"):
            column = f"{modality}_tokens"
            have = [i for i in range(n) if len(rows[column][i])]
            if not have:
                continue
            subset = {name: [rows[name][i] for i in have]
                      for name in (column, "audio_levels") if name in rows}
            codes = model_codes(subset, {modality: shapes[modality]})
            with torch.no_grad():
                decoded = self.model.decode(codes)
            for j, i in enumerate(have):
                if modality == "image":
                    pixels = (decoded["image"][j] + 1) * 127.5  # (3, H, W) in [-1, 1] -> [0, 255]
                    out[i]["image"] = pixels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
                elif modality == "audio":
                    frames = int(rows["audio_frames"][i]) or shapes["audio"][0]
                    out[i]["audio"] = decoded["audio"][j][:frames * hop].clamp(-1, 1).numpy()
                else:
                    stream = rows.get("interleaved_tokens", [[]] * n)[i]
                    # The interleaved text run holds exactly the real characters.
                    run = split_interleaved(np.asarray(stream), self.layout).get("text")
                    length = len(run) if run is not None else len(rows[column][i])
                    out[i]["text"] = decode_ids(decoded["text_ids"][j].numpy(), length,
                                                self.model.text_vocab)
        return out


def _text_bytes(text: str | bytes | None) -> bytes | None:
    if text is None or (isinstance(text, float) and np.isnan(text)):  # pandas' missing value
        return None
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


# ----------------------------------------------------------------------------- files

def collect_samples(inputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Group input files by stem into samples: ``{"key", "source", "image"/"audio"/"text"}``.

    Each input is a file or a folder (searched recursively); files with other extensions are
    skipped. The key is the path relative to the folder without extension, so ``a/cat.png``
    and ``b/cat.png`` stay apart.

    Raises
    ------
    ValueError
        If no usable file is found, or a sample has two files of one modality.
    """
    samples: dict[str, dict[str, Any]] = {}
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise ValueError(f"{item}: no such file or folder")
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for file in files:
            modality = EXTENSIONS.get(file.suffix.lower().lstrip("."))
            if modality is None:
                continue
            key = (file.relative_to(item).with_suffix("") if item.is_dir()
                   else Path(file.stem)).as_posix()
            sample = samples.setdefault(key, {"key": key, "source": str(item)})
            if modality in sample:
                raise ValueError(f"sample {key!r}: two {modality} files ({sample[modality + '_file']}"
                                 f" and {file})")
            sample[modality] = file.read_bytes()
            sample[modality + "_file"] = str(file)
    if not samples:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)}), audio "
                         f"({', '.join(AUDIO_EXTENSIONS)}) or text (txt) files in "
                         f"{', '.join(map(str, inputs))}")
    return [samples[k] for k in sorted(samples)]


def write_tokens(table: pa.Table, codec: Codec, path: Path) -> None:
    """Write token rows as ``.json`` (with the vocabulary) or ``.parquet`` (layout in metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"vocabulary": codec.layout, "token_shapes": {
        k: list(v) for k, v in codec.model.token_shapes().items()},
        "audio_hop_samples": codec.model.config.audio.hop, "tokenizer": codec.tokenizer_id}
    if path.suffix == ".json":
        path.write_text(json.dumps({**header, "samples": table.to_pylist()}, indent=1))
    elif path.suffix == ".parquet":
        metadata = {**(table.schema.metadata or {}), LAYOUT_KEY: json.dumps(header).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)
    else:
        raise ValueError(f"{path}: output must end in .json or .parquet")


def read_tokens(path: str | Path, split: str | None = None) -> dict[str, list]:
    """Token rows as columns from an encode ``.json`` / ``.parquet`` or a token dataset."""
    path = Path(path)
    if path.suffix == ".json":
        samples = json.loads(path.read_text()).get("samples")
        if samples is None:
            raise ValueError(f"{path}: not an mmvq encode output (no 'samples' list)")
        names = list(samples[0]) if samples else ["key"]
        return {name: [s.get(name) for s in samples] for name in names}
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    if path.is_dir() and (any(path.rglob(MANIFEST)) or path.name == TOKENS_DIR
                          or path.parent.name == TOKENS_DIR):
        return read_token_dataset(path, split).to_pydict()
    raise ValueError(f"{path}: expected an encode output (.json or .parquet) or a token dataset "
                     "directory (tokenize output, its tokens/ or a split)")


def write_files(decoded: Sequence[Mapping[str, Any]], sample_rate: int,
                out_dir: Path) -> list[Path]:
    """``KEY.png`` / ``KEY.wav`` / ``KEY.txt`` per decoded sample; returns the files written."""
    written = []
    for sample in decoded:
        base = out_dir / sample["key"]
        base.parent.mkdir(parents=True, exist_ok=True)
        if "image" in sample:
            Image.fromarray(sample["image"]).save(base.with_name(base.name + ".png"))
            written.append(base.with_name(base.name + ".png"))
        if "audio" in sample:
            soundfile.write(base.with_name(base.name + ".wav"), sample["audio"], sample_rate)
            written.append(base.with_name(base.name + ".wav"))
        if "text" in sample:
            base.with_name(base.name + ".txt").write_text(sample["text"] + "\n")
            written.append(base.with_name(base.name + ".txt"))
    return written


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ----------------------------------------------------------------------------- commands
# The parsers live in pipeline.cli (so `mmvq --help` imports none of this); these run them.

def cmd_encode(args: argparse.Namespace) -> int:
    try:
        return _encode(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmvq encode: {err}", file=sys.stderr)
        return 2


def cmd_decode(args: argparse.Namespace) -> int:
    try:
        return _decode(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmvq decode: {err}", file=sys.stderr)
        return 2


def _encode(args: argparse.Namespace) -> int:
    codec = Codec(resolve_model(args.model, args.tracking_uri))
    samples = collect_samples(args.inputs)
    tables = [codec.encode(chunk) for chunk in _chunks(samples, args.batch_size)]
    table = pa.concat_tables(tables)
    write_tokens(table, codec, args.out)
    print(f"encoded {table.num_rows} samples with {codec.tokenizer_id} -> {args.out}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    codec = Codec(resolve_model(args.model, args.tracking_uri))
    columns = read_tokens(args.tokens, args.split)
    n = len(columns["key"]) if args.limit is None else min(args.limit, len(columns["key"]))
    written = []
    for start in range(0, n, args.batch_size):
        stop = min(start + args.batch_size, n)
        rows = {name: values[start:stop] for name, values in columns.items()}
        written += write_files(codec.decode(rows), codec.model.config.audio.sample_rate,
                               args.out)
    print(f"decoded {n} samples into {len(written)} files under {args.out}")
    return 0
