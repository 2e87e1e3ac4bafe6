"""Files <-> tokens with a trained tokenizer: the ``mmvq encode`` / ``mmvq decode`` commands.

``encode`` reads a file or a folder of images, audio and text, groups files by stem into samples
(``cat.png``, ``cat.wav``, ``cat.txt`` and ``cat.json`` are one sample, as in a webdataset
shard), prepares them with the preprocess stage's own pure functions (so the model sees exactly
what training saw: EXIF-upright RGB center crop, mono resampled clip of fixed length, byte ids)
and encodes them with the tokenize stage's row encoder, so the rows equal the token dataset's
rows for the same inputs. ``cat.json`` is the sample's metadata: its ``split`` becomes the
row's split (``train`` when it names none); a json without media of its stem is no sample.
Output is JSON or parquet.

``decode`` reads tokens (that JSON or parquet, or a token dataset written by tokenize) and
writes ``KEY.png``, ``KEY.wav`` and ``KEY.txt`` per sample, under ``--out`` only: a key that is
absolute, climbs (``..``), holds a backslash or a control character, or leads out through a
link is a bad row.

A bad sample (a file that does not decode, is missing or unreadable, two images of one stem)
or a token row that does not decode never costs the others: each is reported on stderr as
``FILE: reason``, the rest is written, and the command exits 1 (0 with ``--skip-bad``). Exit 2
means nothing was done: no model, no inputs, an unreadable token file.

The model is a tokenizer directory (``config.json`` + ``model.safetensors``), a committed train
output (its ``tokenizer/`` subdirectory), or ``models:/NAME/VERSION`` from an MLflow registry,
looked up and downloaded through ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
from PIL import Image

from mmvq.config import MODALITIES
from pipeline.formats.samples import (
    BadSample,
    Resamplers,
    SampleSpec,
    preprocess_sample,
    stack_rows,
)
from pipeline.formats.shards import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, MODALITY_OF
from pipeline.formats.tokens import (
    MANIFEST,
    TOKEN_SCHEMA,
    TOKENS_DIR,
    TokenEncoder,
    model_codes,
    read_token_dataset,
)

# Where a registered model (pipeline.register) keeps the tokenizer inside its artifacts.
REGISTERED_TOKENIZER = "artifacts/tokenizer"
# Parquet schema metadata key holding the vocabulary layout, so a parquet file from encode is
# self-describing like a token dataset with its manifest.
LAYOUT_KEY = b"mmvq.vocabulary"
# "json" is the sample's metadata (its split), not a modality the model encodes.
# PIL and libsndfile put the stream's repr in their messages ("<_io.BytesIO object at 0x7f..>"):
# meaningless to a user, so it is replaced by the file's name.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
# MLflow retries a dead tracking server 7 times with exponential backoff (minutes); a command
# line user wants the error now. Used only where the user has not set them.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class BadInput(ValueError):
    """A sample (encode) or token row (decode) that was not converted.

    The message is one line, ``WHERE: reason``, where WHERE is the sample's file(s), or the
    token file, row and key.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")


# ----------------------------------------------------------------------------- the model

def resolve_model(spec: str, tracking_uri: str | None = None) -> Path:
    """The local tokenizer directory for ``spec``.

    Parameters
    ----------
    spec : a tokenizer directory, a committed train output (holding ``tokenizer/``), or
        ``models:/NAME/VERSION`` (also ``models:/NAME@ALIAS``, ``models:/NAME/latest``)
    tracking_uri : the MLflow tracking server, which is also the registry, for ``models:/``;
        default ``MLFLOW_TRACKING_URI``. Both the version lookup and the artifact download use
        it; MLflow's process-wide default (``./mlflow.db``) is never consulted.

    Raises
    ------
    ValueError
        One line naming ``spec``: not a tokenizer, no tracking URI, a registry that does not
        exist or cannot be reached, an unknown model or version.
    """
    if spec.startswith("models:/"):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(f"{spec}: a registered model needs --tracking-uri or "
                             "MLFLOW_TRACKING_URI")
        local = _download_registered(spec, uri)
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


def _download_registered(spec: str, uri: str) -> Path:
    """The local copy of the model version's artifacts, found and fetched through ``uri`` only.

    ``mlflow.artifacts.download_artifacts("models:/...", registry_uri=...)`` does not use its
    registry_uri for the lookup (``ModelsArtifactRepository._get_model_uri_infos`` asks
    ``mlflow.get_registry_uri()``, which defaults to ``sqlite:///mlflow.db`` in the working
    directory, creating it), so the version is resolved here with an explicit client and only
    its storage location is downloaded.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from sqlalchemy.exc import SQLAlchemyError  # a SQL store that is no MLflow database

    _require_store(spec, uri)
    try:
        with _http_limits():
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = get_model_name_and_version(client, spec)
            if len(found) == 1:  # models:/m-<id>, a logged model rather than a version
                source = client.get_logged_model(found[0]).artifact_location
            else:
                source = client.get_model_version_download_uri(*found)
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=source, tracking_uri=uri, registry_uri=uri))
    except (MlflowException, OSError, SQLAlchemyError) as err:  # requests' errors are OSErrors
        raise ValueError(f"{spec}: {_one_line(err)} (tracking URI {uri})") from err


def _require_store(spec: str, uri: str) -> None:
    """Refuse a SQLite or file store that does not exist: MLflow would create an empty one
    there (a typo would leave a stray database) and then report the model as unknown."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = unquote(parsed.path.removeprefix("/"))  # sqlite:////abs, sqlite:///rel
    elif parsed.scheme == "file" or not (parsed.scheme or uri.startswith("databricks")):
        path = unquote(parsed.path)
    else:
        return
    if path and not Path(path).exists():
        raise ValueError(f"{spec}: no MLflow store at {uri} ({path} does not exist)")


@contextmanager
def _http_limits() -> Iterator[None]:
    """Cap MLflow's HTTP retries for one block, then put the environment back as it was."""
    added = [name for name in _HTTP_LIMITS if name not in os.environ]
    os.environ.update({name: _HTTP_LIMITS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error message, without object reprs, at most ``limit`` characters
    (MLflow's connection errors run to kilobytes of nested reprs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = _OBJECT_REPR.sub("the file", lines[0] if lines else type(err).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class FileTokenizer:
    """A loaded tokenizer plus the tokenize stage's row encoder around it.

    Parameters
    ----------
    model_dir : a tokenizer directory (see :func:`resolve_model`)
    """

    def __init__(self, model_dir: str | Path, text_tokens: str = "ids",
                 text_vocab: str | Path | None = None) -> None:
        # The tokenize stage's own row encoder: encode and the token dataset give equal rows.
        self.encoder = TokenEncoder(str(model_dir), text_tokens=text_tokens,
                                    text_vocab=str(text_vocab) if text_vocab else None)
        self.text_vocab = self.encoder.text_vocab  # None: text tokens are codec codes
        self.model, self.layout = self.encoder.model, self.encoder.layout
        self.tokenizer_id = self.encoder.tokenizer_id
        self.preprocess = SampleSpec.for_model(self.model.config)
        self.resample = Resamplers(self.preprocess.sample_rate)

    def prepare(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """One raw sample -> the preprocessed row that :meth:`encode_rows` takes.

        Parameters
        ----------
        sample : ``key``, optional ``source``, any of ``image`` / ``audio`` (encoded file bytes:
            PNG, JPEG, WAV, FLAC, ...), ``text`` (str or UTF-8 bytes) and ``json`` (metadata
            bytes; its ``split`` is the row's), and optionally ``{member}_file``, the file each
            came from (see :func:`collect_samples`), named in errors

        Raises
        ------
        BadInput
            If the sample has no image, audio or text, or a member does not decode; the
            message starts with the member's file (or the sample's key when there are none).
        """
        raw = {"png": _member_bytes(sample.get("image")), "wav": _member_bytes(sample.get("audio")),
               "txt": _text_bytes(sample.get("text")), "json": _member_bytes(sample.get("json"))}
        raw = {ext: value for ext, value in raw.items() if value is not None}
        if not set(raw) - {"json"}:
            raise BadInput(_where(sample), "no image, audio or text")
        try:
            row = preprocess_sample(raw, self.preprocess, self.resample, self.model.text_vocab)
        except BadSample as err:
            raise _bad_sample(sample, str(err)) from err
        return {**row, "key": str(sample["key"]), "source_shard": str(sample.get("source", ""))}

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Token rows (the token dataset schema) for rows from :meth:`prepare`."""
        if not rows:
            return TOKEN_SCHEMA.empty_table()
        return self.encoder(stack_rows(list(rows)))

    def encode(self, samples: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Token rows (the token dataset schema) for raw samples, all or nothing.

        Parameters
        ----------
        samples : as :meth:`prepare` takes them

        Raises
        ------
        BadInput
            (a ValueError) for the first bad sample. ``mmvq encode`` prepares samples one by one
            instead, to keep the good ones.
        """
        return self.encode_rows([self.prepare(sample) for sample in samples])

    def check_tokenizer(self, rows: Mapping[str, Sequence[Any]]) -> None:
        """Raise ValueError if the rows were written by another tokenizer (``tokenizer``)."""
        ids = {str(t) for t in _column(rows, "tokenizer", None) if t} - {self.tokenizer_id}
        if ids:
            raise ValueError(f"tokens were written by tokenizer {sorted(ids)}, this model is "
                             f"{self.tokenizer_id}: decode them with the model that wrote them")

    def decode(self, rows: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """Per row: ``key`` and the decoded ``image`` (H, W, 3) uint8, ``audio`` float32 clip
        (the real frames only) and ``text`` str, for the modalities the row has codes for.

        Raises
        ------
        ValueError
            If the rows were written by another tokenizer (``tokenizer`` column differs), or
            a row's codes do not fit the model (count, or a code outside the codebook).
        """
        self.check_tokenizer(rows)
        n = len(rows["key"])
        out: list[dict[str, Any]] = [{"key": str(k)} for k in rows["key"]]
        for modality in MODALITIES:
            column = _column(rows, f"{modality}_tokens", None)
            have = [i for i in range(n) if column[i] is not None and len(column[i])]
            if have:
                self._decode_modality(modality, rows, have, out)
        return out

    def _decode_modality(self, modality: str, rows: Mapping[str, Sequence[Any]],
                         have: list[int], out: list[dict[str, Any]]) -> None:
        """Decode one modality of rows ``have`` into ``out`` (their dicts)."""
        from mmvq.modalities.image import to_uint8
        from mmvq.text_vocab import decode_ids
        from mmvq.vocabulary import split_interleaved

        column = f"{modality}_tokens"
        size = self.layout["codebook_sizes"][modality]
        subset = {name: [rows[name][i] for i in have]
                  for name in (column, "audio_levels") if name in rows}
        text_ids = modality == "text" and self.text_vocab is not None
        for codes in subset[column]:
            # The embedding lookup would fail with "index out of range in self", or a
            # scalar quantizer decode garbage: say which code is wrong instead.
            wrong = [c for c in codes if not (isinstance(c, int | np.integer) and 0 <= c < size)]
            if wrong:
                what = "id" if text_ids else "code"
                where = "the text vocabulary" if text_ids else "the codebook"
                raise ValueError(f"{column}: {what} {wrong[0]!r} is not in {where} [0, {size})")
        if text_ids:  # the caption's own ids: the vocabulary decodes them, no model involved
            for j, i in enumerate(have):
                out[i]["text"] = self.text_vocab.decode(subset[column][j])
            return
        shapes = self.model.token_shapes()
        codes = model_codes(subset, {modality: shapes[modality]})
        with torch.no_grad():
            decoded = self.model.decode(codes)
        hop = self.model.config.audio.hop
        frames_column = _column(rows, "audio_frames", 0)
        streams = _column(rows, "interleaved_tokens", None)
        for j, i in enumerate(have):
            if modality == "image":
                out[i]["image"] = to_uint8(decoded["image"][j])  # (3, H, W) -> (H, W, 3)
            elif modality == "audio":
                frames = int(frames_column[i] or 0) or shapes["audio"][0]
                out[i]["audio"] = decoded["audio"][j][:frames * hop].clamp(-1, 1).numpy()
            else:
                # The interleaved text run holds exactly the real characters.
                stream = [] if streams[i] is None else streams[i]
                run = split_interleaved(np.asarray(stream, np.int64), self.layout).get("text")
                length = len(run) if run is not None else len(rows[column][i])
                out[i]["text"] = decode_ids(decoded["text_ids"][j].numpy(), length,
                                            self.model.text_vocab)


def _column(rows: Mapping[str, Sequence[Any]], name: str, fill: Any) -> Sequence[Any]:
    """``rows[name]``, or ``fill`` for every row when the column is absent (hand-made JSON)."""
    values = rows.get(name)
    return [fill] * len(rows["key"]) if values is None else values


def _member_bytes(value: Any) -> bytes | None:
    # Anything that is not bytes is absent: pandas fills a missing member with None or NaN.
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None


def _text_bytes(text: str | bytes | None) -> bytes | None:
    if isinstance(text, str):
        return text.encode("utf-8")
    return _member_bytes(text)


def _files(sample: Mapping[str, Any]) -> list[str]:
    """The files a sample was read from, in member order."""
    return [str(sample[f"{m}_file"]) for m in (*MODALITIES, "json") if f"{m}_file" in sample]


def _where(sample: Mapping[str, Any]) -> str:
    return ", ".join(_files(sample)) or f"sample {sample.get('key')!r}"


def _bad_sample(sample: Mapping[str, Any], reason: str) -> BadInput:
    """The preprocess reason ("image: cannot decode (...)") under the file it concerns."""
    member = reason.split(":", 1)[0]
    file = sample.get(f"{member}_file")
    where = str(file) if file else _where(sample)
    name = repr(Path(file).name) if file else "the file"
    return BadInput(where, _OBJECT_REPR.sub(name, reason))


# ----------------------------------------------------------------------------- files

def collect_samples(inputs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[BadInput]]:
    """Group input files by stem into samples, without reading them.

    Each input is a file or a folder (searched recursively); files with other extensions are
    skipped, and so is a ``.json`` with no image, audio or text of its stem (it describes
    nothing). The key is the path relative to the folder without extension, so ``a/cat.png``
    and ``b/cat.png`` stay apart.

    Returns
    -------
    samples : ``{"key", "source", "image_file" / "audio_file" / "text_file" / "json_file"}``,
        sorted by key; :func:`read_sample` loads their bytes
    bad : inputs that do not exist, and samples with two files of one modality (which one is
        meant is a guess that could pair the wrong files)
    """
    samples: dict[str, dict[str, Any]] = {}
    bad: dict[str, BadInput] = {}
    for item in map(Path, inputs):
        if not item.exists():
            bad[str(item)] = BadInput(str(item), "no such file or folder")
            continue
        files = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for file in files:
            member = MODALITY_OF.get(file.suffix.lower().lstrip("."))
            if member is None:
                continue
            key = (file.relative_to(item).with_suffix("") if item.is_dir()
                   else Path(file.stem)).as_posix()
            sample = samples.setdefault(key, {"key": key, "source": str(item)})
            if sample.get(f"{member}_file") == str(file):  # the same file named twice
                continue
            if f"{member}_file" in sample:
                bad[key] = BadInput(f"{sample[member + '_file']}, {file}",
                                    f"two {member} files for sample {key!r}")
            sample[f"{member}_file"] = str(file)
    good = [samples[k] for k in sorted(samples) if k not in bad
            and any(f"{m}_file" in samples[k] for m in MODALITIES)]
    return good, list(bad.values())


def read_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """``sample`` with each ``{member}_file``'s bytes under ``{member}``.

    Raises
    ------
    BadInput
        If a file cannot be read (vanished, permissions), naming it.
    """
    loaded = dict(sample)
    for member in (*MODALITIES, "json"):
        if f"{member}_file" in sample:
            file = Path(sample[f"{member}_file"])
            try:
                loaded[member] = file.read_bytes()
            except OSError as err:
                raise BadInput(str(file), f"cannot read ({err.strerror or err})") from err
    if isinstance(loaded.get("text"), bytes) and loaded["text"].endswith(b"\n"):
        # A text file's last line ends in a newline, which is not part of the caption;
        # decode writes it back (write_sample), so every caption makes the round trip.
        loaded["text"] = loaded["text"][:-1]
    return loaded


def write_tokens(table: pa.Table, codec: FileTokenizer, path: Path) -> None:
    """Write token rows as ``.json`` (with the vocabulary) or ``.parquet`` (layout in metadata)."""
    if path.suffix not in (".json", ".parquet"):
        raise ValueError(f"{path}: output must end in .json or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"vocabulary": codec.layout, "token_shapes": {
        k: list(v) for k, v in codec.model.token_shapes().items()},
        "audio_hop_samples": codec.model.config.audio.hop, "tokenizer": codec.tokenizer_id}
    if path.suffix == ".json":
        path.write_text(json.dumps({**header, "samples": table.to_pylist()}, indent=1,
                                   ensure_ascii=False), encoding="utf-8")
    else:
        metadata = {**(table.schema.metadata or {}), LAYOUT_KEY: json.dumps(header).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)


def token_text_tokens(path: str | Path) -> dict[str, Any]:
    """What the text tokens of a token file or dataset are (its layout's ``text_tokens``):
    ``{"kind": "ids", "vocab", "vocab_size", "sha256"}`` or ``{"kind": "codes"}``, the latter
    also for files whose layout predates text ids; ``{"kind": "ids"}`` (the tokenizer's own
    vocabulary) when there is no layout at all."""
    path = Path(path)
    layout: Any = None
    try:
        if path.suffix == ".json":
            layout = json.loads(path.read_text(encoding="utf-8")).get("vocabulary")
        elif path.suffix == ".parquet":
            metadata = pq.read_schema(path).metadata or {}
            layout = json.loads(metadata.get(LAYOUT_KEY, b"{}")).get("vocabulary")
        elif path.is_dir():
            from pipeline.formats.tokens import read_manifest
            layout = read_manifest(path).get("vocabulary")
    except (OSError, ValueError, AttributeError):
        layout = None  # read_tokens reports an unreadable file with its reason
    if not isinstance(layout, dict):  # hand-made, or unreadable: the default, the model's ids
        return {"kind": "ids"}
    recorded = layout.get("text_tokens")
    return dict(recorded) if isinstance(recorded, dict) and "kind" in recorded else {"kind": "codes"}


def read_tokens(path: str | Path, split: str | None = None) -> dict[str, list]:
    """Token rows as columns from an encode ``.json`` / ``.parquet`` or a token dataset."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            samples = json.loads(path.read_text(encoding="utf-8")).get("samples")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{path}: not an mmvq encode output ({_one_line(err)})") from err
        if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
            raise ValueError(f"{path}: not an mmvq encode output (no 'samples' list)")
        names = list(dict.fromkeys(["key", *(n for s in samples for n in s)]))
        return {name: [s.get(name) for s in samples] for name in names}
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    if path.is_dir() and (any(path.rglob(MANIFEST)) or path.name == TOKENS_DIR
                          or path.parent.name == TOKENS_DIR):
        return read_token_dataset(path, split).to_pydict()
    raise ValueError(f"{path}: expected an encode output (.json or .parquet) or a token dataset "
                     "directory (tokenize output, its tokens/ or a split)")


def write_sample(sample: Mapping[str, Any], sample_rate: int, out_dir: Path) -> list[Path]:
    """``KEY.png`` / ``KEY.wav`` / ``KEY.txt`` for one decoded sample; returns the files.

    Raises
    ------
    ValueError
        If the key is not a safe relative path (:func:`key_path`) or a target is a link:
        token files come from others, and a key must not choose where its files land.
    """
    base = key_path(str(sample["key"]), out_dir)
    targets = {m: base.with_name(f"{base.name}.{ext}")
               for m, ext in (("image", "png"), ("audio", "wav"), ("text", "txt")) if m in sample}
    for target in targets.values():
        if target.is_symlink():
            raise ValueError(f"{target} is a link; refusing to write through it")
    base.parent.mkdir(parents=True, exist_ok=True)
    if "image" in targets:
        Image.fromarray(sample["image"]).save(targets["image"])
    if "audio" in targets:
        soundfile.write(targets["audio"], sample["audio"], sample_rate)
    if "text" in targets:
        targets["text"].write_text(sample["text"] + "\n", encoding="utf-8", newline="")
    return list(targets.values())


def key_path(key: str, out_dir: Path) -> Path:
    """Where a token row's files go: ``out_dir / key`` (without extension).

    Raises
    ------
    ValueError
        Naming the key, if it holds a control character (NUL truncates a C path, a newline
        forges report lines), a backslash (a separator on Windows: ``..\\x`` climbs there),
        is absolute, empty or has a ``..`` component, or if its folder resolves outside
        ``out_dir`` through a link already there.
    """
    # The row's own name in the report already carries the whole key; the reason quotes at
    # most 80 characters of it, so a long key cannot push the reason out of the line.
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise ValueError(f"key {_short(key)} contains a control character")
    if "\\" in key:
        raise ValueError(f"key {_short(key)} contains a backslash (a path separator on Windows)")
    path = PurePosixPath(key)
    parts = path.parts
    if not parts or path.is_absolute() or ".." in parts:
        raise ValueError(f"key {_short(key)} is not a relative path inside the output folder")
    base = out_dir.joinpath(*parts)
    if not base.parent.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"key {_short(key)} leads outside the output folder (through the link "
                         f"{_first_link(out_dir, parts)})")
    return base


def _short(key: str, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _first_link(out_dir: Path, parts: Sequence[str]) -> Path | None:
    """The first symlink on the way from ``out_dir`` down ``parts``."""
    path = out_dir
    for part in parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ----------------------------------------------------------------------------- commands
# The parsers live in workflows.cli (so `mmvq --help` imports none of this); these run them.
# Exit codes: 0 done; 1 done, but some samples or rows were bad (0 with --skip-bad);
# 2 nothing done (no model, no inputs, unreadable token file).

def cmd_encode(args: argparse.Namespace) -> int:
    """Run ``mmvq encode``; returns the exit code."""
    try:
        return _encode(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmvq encode: {_one_line(err, 600)}", file=sys.stderr)
        return 2


def cmd_decode(args: argparse.Namespace) -> int:
    """Run ``mmvq decode``; returns the exit code."""
    try:
        return _decode(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmvq decode: {_one_line(err, 600)}", file=sys.stderr)
        return 2


def _encode(args: argparse.Namespace) -> int:
    if args.out.suffix not in (".json", ".parquet"):  # before minutes of encoding, not after
        raise ValueError(f"{args.out}: output must end in .json or .parquet")
    codec = FileTokenizer(resolve_model(args.model, args.tracking_uri), args.text_tokens,
                          args.text_vocab)
    samples, bad = collect_samples(args.inputs)
    _report("encode", bad)
    if not samples:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)}), audio "
                         f"({', '.join(AUDIO_EXTENSIONS)}) or text (txt) files to encode in "
                         f"{', '.join(map(str, args.inputs))}")
    tables = []
    for chunk in _chunks(samples, args.batch_size):
        rows, failed = [], []
        for sample in chunk:
            try:
                rows.append(codec.prepare(read_sample(sample)))
            except BadInput as err:
                failed.append(err)
        _report("encode", failed)
        bad += failed
        tables.append(codec.encode_rows(rows))
    table = pa.concat_tables(tables)
    write_tokens(table, codec, args.out)
    print(f"encoded {table.num_rows} samples{_bad_note(bad)} with {codec.tokenizer_id} "
          f"-> {args.out}")
    return 1 if bad and not args.skip_bad else 0


def _decode(args: argparse.Namespace) -> int:
    recorded = token_text_tokens(args.tokens)
    codec = FileTokenizer(resolve_model(args.model, args.tracking_uri), recorded["kind"],
                          args.text_vocab if recorded["kind"] == "ids" else None)
    have = None if codec.text_vocab is None else codec.text_vocab.sha256
    if recorded["kind"] == "ids" and "sha256" in recorded and recorded["sha256"] != have:
        raise ValueError(
            f"{args.tokens}: its text tokens are ids of a {recorded.get('vocab')} vocabulary with "
            f"sha256 {recorded['sha256']}; this decode has {codec.text_vocab.kind} "
            f"{codec.text_vocab.sha256}: pass the file they were encoded with as --text-vocab")
    columns = read_tokens(args.tokens, args.split)
    if "key" not in columns:
        raise ValueError(f"{args.tokens}: no 'key' column; not a token file")
    codec.check_tokenizer(columns)  # the wrong model is the user's mistake, not a bad row
    n = len(columns["key"]) if args.limit is None else min(args.limit, len(columns["key"]))
    rate = codec.model.config.audio.sample_rate
    source = str(args.tokens)
    written: list[Path] = []
    bad: list[BadInput] = []
    for start in range(0, n, args.batch_size):
        rows = {name: values[start:min(start + args.batch_size, n)]
                for name, values in columns.items()}
        decoded, failed = _decode_rows(codec, rows, start, source)
        for row, sample in decoded:
            try:
                written += write_sample(sample, rate, args.out)
            except (ValueError, OSError) as err:
                failed.append((row, BadInput(_row_name(source, row, sample["key"]),
                                             _one_line(err))))
        failed.sort(key=lambda item: item[0])
        _report("decode", [err for _, err in failed])
        bad += [err for _, err in failed]
    print(f"decoded {n - len(bad)} samples{_bad_note(bad)} into {len(written)} files "
          f"under {args.out}")
    return 1 if bad and not args.skip_bad else 0


# What a malformed row raises somewhere in decoding (counts, ranges, None codes, torch).
_ROW_ERRORS = (ValueError, TypeError, IndexError, KeyError, RuntimeError)


def _decode_rows(codec: FileTokenizer, rows: Mapping[str, Sequence[Any]], start: int, source: str,
                 ) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, BadInput]]]:
    """(row number, decoded sample) for the rows that decode, (row number, error) for the rest.

    The batch is decoded at once; only if that fails is each row decoded alone, to tell the
    bad rows from the good ones.
    """
    try:
        return list(enumerate(codec.decode(rows), start)), []
    except _ROW_ERRORS:
        pass
    decoded, bad = [], []
    for i, key in enumerate(rows["key"]):
        try:
            decoded.append((start + i, codec.decode({k: v[i:i + 1] for k, v in rows.items()})[0]))
        except _ROW_ERRORS as err:
            # model_codes numbers rows within its batch: alone, every row is "row 0".
            reason = re.sub(r" of row \d+", "", _one_line(err))
            bad.append((start + i, BadInput(_row_name(source, start + i, key), reason)))
    return decoded, bad


def _row_name(source: str, row: int, key: Any) -> str:
    return f"{source} row {row} (key {str(key)!r})"


def _report(command: str, bad: Sequence[BadInput]) -> None:
    for err in bad:
        print(f"mmvq {command}: {_one_line(err)}", file=sys.stderr)


def _bad_note(bad: Sequence[BadInput]) -> str:
    return f", {len(bad)} bad (reasons above)" if bad else ""
