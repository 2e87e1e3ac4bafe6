"""Ingest stage: users' aligned data -> validated webdataset shards plus a manifest.

Three sources, one output. A *folder* of files sharing a stem (``a.jpg``, ``a.flac``, ``a.txt``,
``a.json``; the stem is the path up to the file name's *last* ``.``, so ``IMG_1.final.jpg`` is
the image of stem ``IMG_1.final``), a *CSV/JSONL manifest* (one row per sample: ``key``,
``image``, ``audio``, ``text`` or ``text_path``, ``split``, anything else becomes json metadata),
or existing *shards* written by any tool (a folder of ``.tar`` files, or one ``.tar``). The
output is ``{out}/{split}/shard-NNNNNN.tar`` with every key's members contiguous and every key
unique, ``quarantine.parquet`` (``key``, ``shard``, ``stage``, ``reason``, ``origin``: the
user's file or row) for what could not be taken, and ``manifest.json`` (shards with sample
count, bytes and sha256; counts per split and per modality; ``in = out + quarantined``).

Keys: readers split a member name ``KEY.EXT`` at the first ``.`` of its last component, so a
key has no ``.`` there. A folder stem or a manifest key becomes its key by :func:`shard_key`
(``.`` -> ``_`` in the last component: ``IMG_1.final`` -> ``IMG_1_final``), the same way for
both; two samples that map to one key are a duplicate key.

Ingest checks containers, not content: it never decodes an image (preprocess does, and
quarantines what does not decode). What it refuses: duplicate keys (the first is kept, later ones
are quarantined naming the first's files), two files for one modality or extension of a sample
(``y.jpg`` + ``y.JPG`` would be two members named ``y.jpg``; ``y.jpg`` + ``y.png`` leave readers
to guess which is the image), unsafe member names (absolute or ``..``), missing or truncated
files, links, duplicate members, json that does not parse, split names that are not plain words,
members over ``max_member_bytes`` (256 MiB by default; refused from their size, never read).
Members of one key that are scattered through an input shard are merged (repaired).

Where files may come from. A folder (or folder of shards) is listed without following any
symbolic link, not even one that stays inside it: following only the inner ones would mean
resolving every target and still races a link swapped after the check, and a link is rarely
what a user meant to ingest. A link (to a file or a folder), or anything that is not a regular
file (a FIFO, a socket), is quarantined naming it; a sample with such a file is quarantined
whole rather than taken without that member. The source named itself may be a link. A
manifest's paths (relative, absolute or URIs) are resolved, links included, and must lie inside
the manifest's folder; a path that leaves it is quarantined naming the path and where it
resolved, unless ``allow_outside`` (``--allow-outside``) trusts the manifest to name any file.

Accounting: every sample's json member records where it came from under :data:`ORIGIN_FIELD`,
``{"source": ..., "files": {ext: file}}``: the folder stem, manifest row (``index.csv row 3``)
or shard, and each member's original file (a manifest's paths as written; ``a.tar#x.png`` for a
shard member). Paths are relative to the ingest source (a manifest's or single shard's folder),
which ``manifest.json`` names, so the shards are the same bytes wherever the source lives. The
user's own json fields are kept as they are; the field is written by every ingest, replacing one
already there.

The output folder: one that holds another source's ingest output, or files that are not ingest
output at all, is refused unless ``overwrite`` (its shards would be deleted). Rerunning the same
source into it resumes. A call that fails leaves nothing behind in a folder it created; one that
is interrupted keeps its committed shards for the rerun.

Writing is resumable: the plan (which sample goes to which shard) is computed from names, sizes
and json metadata before any other content is read, and is the same on every run with the same
inputs and config. Each shard is written under a temporary name, moved into place, and recorded
with the digest of its plan and its sha256 in a journal; a rerun keeps every shard whose plan and
sha256 match and writes the rest, so the result is byte-identical to an uninterrupted run.

The members' names and the stream reader that checks them when shards are read
(:func:`pipeline.formats.shards.read_shard`) are the shard contract, in :mod:`pipeline.formats.shards`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import to_dict
from pipeline.formats.shards import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MODALITY_OF,
    ORIGIN_FIELD,
    QUARANTINE_FILE,
    SHARD_MANIFEST,
    SPLIT_NAME,
    TEXT_EXTENSIONS,
    EndRecorder,
    end_problem,
    key_problem,
    member_problem,
    shard_key,
    split_name,
    split_stem,
    unsafe_name,
)
from pipeline.stage import StageContext
from pipeline.storage import Location, resolve, write_bytes_atomically, write_with

JOURNAL = ".ingest-journal.jsonl"
MANIFEST_VERSION = 1
_FORMAT_OF_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".tar": "shards"}
# Tar headers carry no time, owner or host, so the same samples give the same bytes.
_TAR_MTIME = 0
_TAR_OWNER = "mmvq"


class IngestError(RuntimeError):
    """Ingest cannot go on (strict mode, unreadable source); the message names file and key."""


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how to cut it into shards."""

    # Folder, CSV/JSONL manifest file, one .tar shard or a folder of them: a path or URI
    # (s3://, file://).
    source: str = ""
    # How to read ``source``; "auto" picks csv/jsonl/shards by the file suffix, shards if the
    # folder holds .tar files, else folder.
    format: Literal["auto", "folder", "csv", "jsonl", "shards"] = "auto"
    # A shard closes at this many samples. Thousands of samples per shard is the usual
    # webdataset size; the demo's small default keeps several shards per split.
    max_samples_per_shard: int = 1000
    # ... or before it would pass this many bytes (0: no byte limit). ~256 MB shards stream well
    # from object stores; a single larger sample gets a shard of its own.
    max_bytes_per_shard: int = 256 * 1024 * 1024
    default_split: str = "train"  # for samples whose row/json names no split
    # Of the samples that name no split, this fraction goes to "val" (by a hash of the key), so
    # a folder of photos gets a held-out split for train's validation and the evaluate stage.
    val_fraction: float = 0.0
    strict: bool = False  # fail on the first sample that would be quarantined
    # Write into an output folder that holds another source's shards or unrelated files. Off by
    # default because writing there deletes the old shards: a mistyped --out must not.
    overwrite: bool = False
    # Let a CSV/JSONL manifest name files outside its own folder (absolute paths, "..", links
    # leading out, other filesystems). Off by default: a manifest is data someone handed over,
    # and one naming ~/.ssh/id_rsa would otherwise copy it into shards that get shared.
    allow_outside: bool = False
    # A member (file, inline text, shard member) larger than this is quarantined from its size,
    # before it is read: writing a shard holds one member in memory at a time, so this bounds
    # ingest's memory. 256 MiB is far above any image or clip the tokenizer trains on (preprocess
    # crops and cuts them), the same as a shard's default byte budget, and below the shard
    # reader's own 1 GiB limit, so what ingest writes preprocess can read.
    max_member_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got "
                             f"{self.max_samples_per_shard}")
        if self.max_bytes_per_shard < 0:
            raise ValueError(f"max_bytes_per_shard must be >= 0, got {self.max_bytes_per_shard}")
        if self.max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be >= 1, got {self.max_member_bytes}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not SPLIT_NAME.fullmatch(self.default_split):
            raise ValueError(f"default_split {self.default_split!r} is not a plain name")



def _key_of(name: str) -> tuple[str, str | None]:
    """(key, why it cannot be used or None); the name is checked before mapping, so that a
    ``..`` is refused rather than turned into ``__``."""
    key = shard_key(name)
    return key, unsafe_name(name) or key_problem(key)


# ----------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class MemberRef:
    """Where one member's bytes come from: inline data, or a byte range of a file."""

    ext: str
    size: int
    location: Location | None = None  # None: ``data`` holds the bytes
    offset: int = 0
    data: bytes | None = None

    def identity(self) -> list[Any]:
        """What the plan digest covers: source, range and size (content is hashed inline)."""
        if self.location is None:
            return [self.ext, "inline", hashlib.sha256(self.data or b"").hexdigest()]
        return [self.ext, self.location.uri, self.offset, self.size]


@dataclass(frozen=True)
class Origin:
    """Where a sample came from: the record in its json and the words for messages."""

    source: str  # relative to the ingest source: folder stem, "index.csv row 3", shard path
    files: dict[str, str]  # extension -> the member's original file, relative likewise
    where: str  # the sample's files (or row, or shard#key) as full paths or URIs
    uris: dict[str, str] = field(default_factory=dict)  # extension -> full path or URI

    def record(self) -> dict[str, Any]:
        """The :data:`ORIGIN_FIELD` value."""
        return {"source": self.source, "files": dict(sorted(self.files.items()))}


@dataclass(frozen=True)
class PlannedSample:
    key: str
    split: str
    members: tuple[MemberRef, ...]
    source: str  # the folder stem / row / shard it came from, for messages
    origin: str  # its original files (or row), for messages naming them


@dataclass(frozen=True)
class Rejected:
    key: str
    source: str  # the quarantine table's ``shard``: folder stem, manifest row or shard
    reason: str
    origin: str = ""  # the most specific original file or row known; empty: ``source``


def plan_samples(config: IngestConfig) -> Iterator[PlannedSample | Rejected]:
    """The samples of ``config.source`` in a fixed order, or why each rejected one was.

    Only names, sizes and json metadata are read here; content is read when writing. A key seen
    before (also two names mapping to one key) rejects the later sample, naming the first's
    files.

    Raises
    ------
    IngestError
        If the source is missing, unreadable or of a format that cannot be told.
    """
    source = _resolve(config.source, "ingest source")
    fmt = _detect_format(config.format, source)
    raw = {"folder": _plan_folder, "csv": _plan_table, "jsonl": _plan_table,
           "shards": _plan_shards}[fmt](source, config, fmt)
    first_seen: dict[str, str] = {}
    for item in raw:
        if isinstance(item, PlannedSample):
            if item.key in first_seen:
                item = Rejected(item.key, item.source,
                                f"duplicate key {item.key!r} (first taken from "
                                f"{first_seen[item.key]})", item.origin)
            else:
                first_seen[item.key] = item.origin
        yield item


def _resolve(where: str | os.PathLike[str], what: str) -> Location:
    try:
        return resolve(where)
    except ValueError as err:
        raise IngestError(f"{what}: {err}") from err


def _detect_format(fmt: str, source: Location) -> str:
    if not source.exists():
        raise IngestError(f"ingest source {source} does not exist")
    if fmt == "auto" and not source.is_file():
        return "shards" if source.files((".tar",)) else "folder"
    if fmt == "auto":
        suffix = posixpath.splitext(source.path)[1].lower()
        if suffix not in _FORMAT_OF_SUFFIX:
            raise IngestError(f"ingest source {source}: cannot tell the format from suffix "
                              f"{suffix!r}; set format to csv, jsonl or shards")
        return _FORMAT_OF_SUFFIX[suffix]
    if fmt == "folder" and source.is_file():
        raise IngestError(f"ingest source {source} is a file; format folder needs a folder")
    if fmt in ("csv", "jsonl") and not source.is_file():
        raise IngestError(f"ingest source {source} is a folder; format {fmt} needs a "
                          "manifest file")
    return fmt


def _plan_folder(source: Location, config: IngestConfig, _fmt: str,
                 ) -> Iterator[PlannedSample | Rejected]:
    groups: dict[str, list[tuple[str, str, pafs.FileInfo]]] = {}  # stem -> (ext, name, info)
    refused: dict[str, tuple[str, str]] = {}  # stem -> (its first link or special file, why)
    files, entries = _listing(source)
    for rel, reason, alone in entries:
        stem = split_stem(rel)[0]
        if alone or stem is None:
            uri = source.join(rel).uri
            yield Rejected(rel, uri, reason, uri)
        else:
            refused.setdefault(stem, (rel, reason))
    for info in files:
        rel = source.relative(info.path)
        stem, ext = split_stem(rel)
        if stem is None:
            uri = source.join(rel).uri
            yield Rejected(rel, uri, f"file {rel!r} has no extension", uri)
            continue
        groups.setdefault(stem, []).append((ext, rel, info))
    for stem in sorted(groups.keys() | refused.keys()):
        if stem in refused:  # not taken without the member the user meant it to have
            rel, reason = refused[stem]
            yield Rejected(shard_key(stem), source.join(stem).uri, reason, source.join(rel).uri)
        else:
            yield _folder_sample(source, stem, sorted(groups[stem], key=lambda f: f[:2]), config)


def _listing(source: Location, suffixes: tuple[str, ...] = (),
             ) -> tuple[list[pafs.FileInfo], list[tuple[str, str, bool]]]:
    """The regular files below ``source`` (sorted by path, hidden ones skipped, as
    :meth:`Location.files`), and the entries refused: ``(relative path, why, alone)``.

    On a local disk nothing is followed: a link is refused whatever it points at, a link to a
    folder (or a dangling one) ``alone`` (it names no sample), and so is anything that is not a
    regular file. Object stores have no links. ``suffixes`` filters files and file links.
    """
    if not isinstance(source.fs, pafs.LocalFileSystem):  # its paths are the disk's own
        return source.files(suffixes), []
    files: list[pafs.FileInfo] = []
    refused: list[tuple[str, str, bool]] = []
    pending = [source.path]
    while pending:
        with os.scandir(pending.pop()) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = source.relative(entry.path)
            wanted = not suffixes or entry.name.endswith(suffixes)
            if entry.is_symlink():
                folder = entry.is_dir() or not os.path.exists(entry.path)
                if wanted or folder:
                    why = (f"{rel!r} is a symbolic link to {os.readlink(entry.path)!r}: ingest "
                           "never follows links (copy what it points at into the source folder)")
                    refused.append((rel, why, folder))
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif not entry.is_file(follow_symlinks=False):
                if wanted:
                    why = f"{rel!r} is not a regular file (a FIFO, socket or device)"
                    refused.append((rel, why, False))
            elif wanted:
                stat = entry.stat(follow_symlinks=False)
                files.append(pafs.FileInfo(entry.path, pafs.FileType.File, size=stat.st_size,
                                           mtime_ns=stat.st_mtime_ns))
    return sorted(files, key=lambda i: i.path), sorted(refused)


def _folder_sample(source: Location, stem: str, files: list[tuple[str, str, pafs.FileInfo]],
                   config: IngestConfig) -> PlannedSample | Rejected:
    """One stem's files -> its sample, or why not."""
    uris = {rel: source.join(rel).uri for _, rel, _ in files}
    where = source.join(stem).uri
    if clash := _clash(shard_key(stem), [(ext, rel) for ext, rel, _ in files]):
        reason, culprit = clash
        return Rejected(shard_key(stem), where, reason, uris[culprit])
    members = tuple(MemberRef(ext, info.size, Location(source.fs, info.path, uris[rel]))
                    for ext, rel, info in files)
    origin = Origin(stem, {ext: rel for ext, rel, _ in files}, ", ".join(uris.values()),
                    {ext: uris[rel] for ext, rel, _ in files})
    return _finish_sample(stem, members, origin, where, config)


def _clash(key: str, named: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """(why, the later file) if two of a sample's files would be one member or one modality.

    ``y.jpg`` + ``y.JPG`` would be two members named ``y.jpg``; ``y.jpg`` + ``y.png`` leave
    every reader to guess which is the image. Neither can be repaired without guessing.
    """
    groups: dict[str, list[str]] = {}
    for ext, name in named:
        kind = MODALITY_OF.get(ext)
        label = f"{kind} files" if kind else f"files with extension {ext!r}"
        groups.setdefault(label, []).append(name)
    for label, names in sorted(groups.items()):
        if len(names) > 1:
            names = sorted(names)
            count = {2: "two", 3: "three"}.get(len(names), str(len(names)))
            return f"{count} {label} for key {key!r}: {', '.join(names)}", names[1]
    return None


def _plan_table(source: Location, config: IngestConfig, fmt: str,
                ) -> Iterator[PlannedSample | Rejected]:
    text = source.read_bytes().decode("utf-8-sig")
    base = source.parent()
    rows: Iterable[dict[str, Any]]
    if fmt == "csv":
        rows = csv.DictReader(io.StringIO(text))
    else:
        rows = (_json_row(line, source, n) for n, line in enumerate(text.splitlines(), 1)
                if line.strip())
    for number, row in enumerate(rows, 1):
        where = f"{source.uri} row {number}"
        label = f"{posixpath.basename(source.path)} row {number}"
        try:
            yield _row_sample(row, base, where, label, config)
        except _RowError as err:
            yield Rejected(str(row.get("key") or ""), where, str(err), err.origin or where)


class _RowError(ValueError):
    """A manifest row that cannot be a sample; ``origin`` names the file to blame, if one is."""

    def __init__(self, reason: str, origin: str = "") -> None:
        super().__init__(reason)
        self.origin = origin


def _json_row(line: str, source: Location, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return {"__error__": f"line {number} is not JSON: {err}"}
    return row if isinstance(row, dict) else {"__error__": f"line {number} is not an object"}


def _row_sample(row: dict[str, Any], base: Location, where: str, label: str,
                config: IngestConfig) -> PlannedSample | Rejected:
    if "__error__" in row:
        raise _RowError(row["__error__"])
    name = str(row.get("key") or "").strip()
    if problem := _key_of(name)[1]:
        raise _RowError(problem)
    members: list[MemberRef] = []
    files: dict[str, str] = {}  # as the row wrote them, for the origin record
    uris: dict[str, str] = {}
    for column, allowed in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS),
                            ("text_path", TEXT_EXTENSIONS)):
        if value := str(row.get(column) or "").strip():
            ref = _file_member(value, base, column, allowed, config.allow_outside)
            members.append(ref)
            files[ref.ext], uris[ref.ext] = value, str(ref.location)
    if text := str(row.get("text") or ""):
        if any(m.ext == "txt" for m in members):
            raise _RowError("both text and text_path are given")
        members.append(MemberRef("txt", len(text.encode()), data=text.encode()))
    split = str(row.get("split") or "").strip()
    extra = {k: v for k, v in row.items()
             if k not in ("key", "image", "audio", "text", "text_path", "split")
             and v not in (None, "")}
    return _finish_sample(name, tuple(members), Origin(label, files, where, uris), where, config,
                          {**extra, "split": split} if split else extra)


def _file_member(value: str, base: Location, column: str, allowed: tuple[str, ...],
                 allow_outside: bool) -> MemberRef:
    location = resolve(value) if "://" in value or value.startswith("/") else base.join(value)
    if not allow_outside:
        location = _confined(location, base, f"{column}: {value!r}")
    ext = posixpath.splitext(location.path)[1].lower().lstrip(".")
    if ext not in allowed:
        raise _RowError(f"{column}: {value!r} has extension {ext!r}, not one of "
                        f"{'|'.join(allowed)}", location.uri)
    info = location.fs.get_file_info(location.path)
    if info.type != pafs.FileType.File:
        raise _RowError(f"{column}: file {location} not found", location.uri)
    return MemberRef(ext, info.size, location)


def _confined(location: Location, root: Location, what: str) -> Location:
    """``location`` resolved (``..`` and, on a local disk, every link), if it lies inside
    ``root``; the resolved path is the one read, so the file checked is the file taken.

    Raises
    ------
    _RowError
        If it resolves outside ``root`` or onto another filesystem, naming both.
    """
    if isinstance(location.fs, pafs.LocalFileSystem) and isinstance(root.fs, pafs.LocalFileSystem):
        path, top = os.path.realpath(location.path), os.path.realpath(root.path)
        inside = os.path.commonpath([path, top]) == top
    else:
        path, top = posixpath.normpath(location.path), posixpath.normpath(root.path)
        inside = (location.fs.type_name == root.fs.type_name and location.fs.equals(root.fs)
                  and (path == top or path.startswith(top.rstrip("/") + "/")))
    if not inside:
        raise _RowError(f"{what} resolves to {path}, outside {top} (the manifest's folder); "
                        "pass --allow-outside (ingest.allow_outside) to let a manifest name "
                        "files anywhere", location.uri)
    return Location(location.fs, path, location.uri)


def _plan_shards(source: Location, config: IngestConfig, _fmt: str,
                 ) -> Iterator[PlannedSample | Rejected]:
    if source.is_file():  # one shard, named relative to its folder
        shards = [(source, posixpath.basename(source.path), source.size())]
    else:
        files, refused = _listing(source, (".tar",))
        for rel, reason, _ in refused:
            uri = source.join(rel).uri
            yield Rejected(rel, uri, reason, uri)
        shards = [(Location(source.fs, i.path, source.join(source.relative(i.path)).uri),
                   source.relative(i.path), i.size) for i in files]
    for shard, rel, size in shards:
        yield from _index_shard(shard, rel, size, config)


def _index_shard(shard: Location, rel: str, size: int, config: IngestConfig,
                 ) -> Iterator[PlannedSample | Rejected]:
    """Group a shard's members by key from its headers (seeking over the data), merging
    out-of-order runs of a key; members are read later by byte range."""
    groups: dict[str, list[tarfile.TarInfo]] = {}
    errors: dict[str, tuple[str, str]] = {}  # key -> (reason, origin)
    infos: list[tarfile.TarInfo] = []
    with shard.fs.open_input_file(shard.path) as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:", tarinfo=EndRecorder)  # noqa: SIM115
            infos.extend(i for i in tar if not i.isdir())
            problem = end_problem(tar, infos[-1].name if infos else None)
        except (tarfile.TarError, OSError, EOFError) as err:
            if not infos:
                yield Rejected("", shard.uri, f"shard is not a readable tar: {err}", shard.uri)
                return
            problem = f"shard truncated or corrupt after member {infos[-1].name!r}: {err}"
    for info in infos:
        key, ext = split_name(info.name)
        if key is None:
            yield Rejected(info.name, shard.uri, f"member {info.name!r} has no extension",
                           f"{shard.uri}#{info.name}")
            continue
        members = groups.setdefault(key, [])
        bad = (member_problem(info, ext, {split_name(m.name)[1]: b"" for m in members}, size + 1)
               or (info.offset_data + info.size > size
                   and f"member {info.name!r} is cut off by the end of the file")
               or key_problem(key))
        if bad and key not in errors:
            errors[key] = (bad, f"{shard.uri}#{info.name}")
        members.append(info)
    if problem and infos:  # the last sample may have lost members
        errors.setdefault(split_name(infos[-1].name)[0] or infos[-1].name,
                          (problem, f"{shard.uri}#{infos[-1].name}"))
    for key, infos_of_key in groups.items():
        if key in errors:
            yield Rejected(key, shard.uri, *errors[key])
        else:
            yield _shard_sample(shard, rel, key, infos_of_key, config)


def _shard_sample(shard: Location, rel: str, key: str, infos: list[tarfile.TarInfo],
                  config: IngestConfig) -> PlannedSample | Rejected:
    """One key's members of an input shard -> its sample, or why not."""
    named = sorted((split_name(i.name)[1], i.name, i) for i in infos)
    if clash := _clash(key, [(ext, name) for ext, name, _ in named]):
        reason, culprit = clash
        return Rejected(key, shard.uri, reason, f"{shard.uri}#{culprit}")
    refs = tuple(MemberRef(ext, i.size, shard, i.offset_data) for ext, _, i in named)
    origin = Origin(rel, {ext: f"{rel}#{name}" for ext, name, _ in named}, f"{shard.uri}#{key}",
                    {ext: f"{shard.uri}#{name}" for ext, name, _ in named})
    return _finish_sample(key, refs, origin, shard.uri, config)


def _finish_sample(name: str, members: tuple[MemberRef, ...], origin: Origin, where: str,
                   config: IngestConfig, metadata: dict[str, Any] | None = None,
                   ) -> PlannedSample | Rejected:
    """Check the key, take the split from the json metadata, and write the json member with
    the origin record.

    ``metadata`` is a manifest row's json; for folders and shards it is the sample's json
    member, or ``{"split": default_split}`` for a sample without one.
    """
    key, problem = _key_of(name)
    if problem:
        return Rejected(key, where, problem, origin.where)
    for member in members:  # before the json is read, and never read at all
        if member.size > config.max_member_bytes:
            culprit = origin.uris.get(member.ext, f"{origin.where} ({member.ext})")
            return Rejected(key, where, f"{culprit} has {member.size} bytes, over the "
                            f"max_member_bytes limit of {config.max_member_bytes} "
                            "(ingest.max_member_bytes, --max-member-bytes)", culprit)
    blame = origin.uris.get("json", origin.where)  # json and split problems are the json's
    if metadata is None:
        try:
            metadata = _member_metadata(members, config)
        except _BadJson as err:
            return Rejected(key, where, f"json: {err}", blame)
    split = str(metadata["split"]) if "split" in metadata else _unnamed_split(key, config)
    if not SPLIT_NAME.fullmatch(split):
        return Rejected(key, where, f"split {split!r} is not a plain name ([A-Za-z0-9_-]+)",
                        blame)
    data = _json_bytes({**metadata, "split": split, ORIGIN_FIELD: origin.record()})
    members = (*(m for m in members if m.ext != "json"), MemberRef("json", len(data), data=data))
    return PlannedSample(key, split, tuple(sorted(members, key=lambda m: m.ext)), where,
                         origin.where)


def _unnamed_split(key: str, config: IngestConfig) -> str:
    """The split of a sample that names none: ``val`` for a ``val_fraction`` of keys, chosen by
    a hash of the key (the same on every run and machine, and stable as data is added),
    ``default_split`` for the rest."""
    if config.val_fraction > 0:
        draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        if draw < config.val_fraction:
            return "val"
    return config.default_split


def _member_metadata(members: tuple[MemberRef, ...], config: IngestConfig) -> dict[str, Any]:
    """The sample's json member as an object (:class:`_BadJson` saying why it is not one)."""
    ref = next((m for m in members if m.ext == "json"), None)
    if ref is None:
        return {}
    try:
        parsed = json.loads(_read_member(ref))
    except (ValueError, RecursionError) as err:
        raise _BadJson(f"does not parse ({err})") from err
    if not isinstance(parsed, dict):
        raise _BadJson(f"does not parse (a {type(parsed).__name__}, not an object)")
    return parsed


class _BadJson(ValueError):
    """A sample's json member is not a JSON object; the message says why."""


def _json_bytes(value: dict[str, Any]) -> bytes:
    """Sorted keys and UTF-8 as written, so captions stay readable and the bytes are the same
    on every run; a lone surrogate (which UTF-8 cannot hold) is kept as a ``\\u`` escape."""
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, sort_keys=True).encode()


def _read_member(ref: MemberRef) -> bytes:
    if ref.location is None:
        return ref.data or b""
    data = ref.location.read_range(ref.offset, ref.size)
    if len(data) != ref.size:
        raise IngestError(f"{ref.location}: expected {ref.size} bytes at {ref.offset}, "
                          f"read {len(data)} (changed since planning?)")
    return data


# ----------------------------------------------------------------------------- packing

@dataclass(frozen=True)
class ShardPlan:
    path: str  # relative to the output, e.g. "train/shard-000000.tar"
    split: str
    samples: tuple[PlannedSample, ...]

    def digest(self) -> str:
        """Hash of what goes into the shard: keys, members and their sources."""
        payload = [[s.key, s.split, [m.identity() for m in s.members]] for s in self.samples]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _member_bytes(name: str, size: int) -> int:
    """Bytes one member takes in the tar: header(s) plus data padded to 512-byte blocks."""
    header = len(_tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    return header + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def sample_bytes(sample: PlannedSample) -> int:
    return sum(_member_bytes(f"{sample.key}.{m.ext}", m.size) for m in sample.members)


def pack(samples: Iterable[PlannedSample], max_samples: int, max_bytes: int) -> list[ShardPlan]:
    """Cut each split's samples, in order, into shards of at most ``max_samples`` samples and
    (unless 0) ``max_bytes`` bytes; a sample larger than ``max_bytes`` gets a shard of its own."""
    open_: dict[str, tuple[list[PlannedSample], int]] = {}
    counts: dict[str, int] = {}
    shards: list[ShardPlan] = []

    def close(split: str) -> None:
        members, _ = open_.pop(split)
        index = counts.get(split, 0)
        counts[split] = index + 1
        shards.append(ShardPlan(f"{split}/shard-{index:06d}.tar", split, tuple(members)))

    end_blocks = 2 * tarfile.BLOCKSIZE
    for sample in samples:
        size = sample_bytes(sample)
        members, used = open_.get(sample.split, ([], 0))
        if members and (len(members) >= max_samples
                        or (max_bytes and used + size + end_blocks > max_bytes)):
            close(sample.split)
            members, used = [], 0
        open_[sample.split] = (members + [sample], used + size)
    for split in list(open_):
        close(split)
    return sorted(shards, key=lambda s: s.path)


# ----------------------------------------------------------------------------- writing

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o444
    info.uname = info.gname = _TAR_OWNER
    return info


class _HashingWriter:
    """Passes writes through while hashing and counting them."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink, self.digest, self.bytes = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        self.sink.write(data)
        return len(data)


def write_shard(plan: ShardPlan, stream: IO[bytes]) -> dict[str, Any]:
    """Write ``plan`` as a tar into ``stream``; returns its manifest record."""
    sink = _HashingWriter(stream)
    modalities: dict[str, int] = {}
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in plan.samples:
            for ref in sample.members:
                data = _read_member(ref)
                tar.addfile(_tarinfo(f"{sample.key}.{ref.ext}", len(data)), io.BytesIO(data))
                modality = MODALITY_OF.get(ref.ext, "other")
                modalities[modality] = modalities.get(modality, 0) + 1
    return {"path": plan.path, "split": plan.split, "samples": len(plan.samples),
            "bytes": sink.bytes, "sha256": sink.digest.hexdigest(), "plan": plan.digest(),
            "modalities": dict(sorted(modalities.items()))}


def ingest(config: IngestConfig, out: str | os.PathLike[str] | Location,
           on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ingest ``config.source`` into shards under ``out``; resumes a previous partial run.

    A call that fails leaves nothing behind in a folder it created. One that is interrupted
    (Ctrl-C, a killed worker) keeps the shards it committed, which a rerun resumes from.

    Parameters
    ----------
    config : what to read and how to shard it.
    out : output directory, a path or URI. It must be new, empty, or hold an earlier ingest of
        the same source, unless ``config.overwrite``.
    on_shard : called with each shard's record after it is committed (progress, tests).

    Returns
    -------
    The manifest (also written to ``out/manifest.json``).

    Raises
    ------
    IngestError
        In strict mode, at the first rejected sample, naming its source, key and reason; for a
        missing or unreadable source; for an ``out`` holding something else, naming it, the
        source it holds and the new source.
    """
    if not config.source:
        raise IngestError("ingest.source is empty: name a folder, CSV/JSONL manifest or shards")
    out = out if isinstance(out, Location) else _resolve(out, "ingest output")
    _check_output(out, config)
    created = _outermost_missing(out)
    out.mkdir()
    try:
        return _ingest_into(out, config, on_shard)
    except BaseException as err:
        # Shards committed before an interruption are the rerun's head start; after a failure
        # (or with nothing committed yet) folders of our making would only mislead.
        if created and (isinstance(err, Exception) or not _known_shards(out)):
            created.delete()
        raise


def _outermost_missing(out: Location) -> Location | None:
    """The outermost folder on the way to ``out`` that does not exist yet (the one ``mkdir``
    creates along with everything below it), or None if ``out`` exists."""
    missing = None
    while not out.exists():
        missing, parent = out, out.parent()
        if parent.path in ("", out.path):
            break
        out = parent
    return missing


def _ingest_into(out: Location, config: IngestConfig,
                 on_shard: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    planned, rejected = _plan(config)
    plans = pack(planned, config.max_samples_per_shard, config.max_bytes_per_shard)
    known = _known_shards(out)
    journal = out.join(JOURNAL)
    # The first line says which source the folder holds, so a rerun of another source is
    # refused from the moment the first shard is written, not only once a manifest exists.
    journal_lines = [json.dumps({"source": config.source}, sort_keys=True)]
    write_bytes_atomically(journal, (journal_lines[0] + "\n").encode())
    records = []
    for plan in plans:
        record = known.get(plan.path)
        target = out.join(plan.path)
        if not (record and record["plan"] == plan.digest() and target.is_file()
                and target.sha256() == record["sha256"]):
            record = write_with(target, lambda stream, p=plan: write_shard(p, stream))
        records.append(record)
        journal_lines.append(json.dumps(record, sort_keys=True))
        # The journal is what a rerun trusts; rewritten whole so it is never half a line.
        write_bytes_atomically(journal, ("\n".join(journal_lines) + "\n").encode())
        if on_shard:
            on_shard(record)
    _remove_strays(out, {p.path for p in plans})
    write_with(out.join(QUARANTINE_FILE), lambda stream: pq.write_table(_quarantine_table(rejected),
                                                                   stream))
    manifest = _manifest(config, records, rejected)
    write_bytes_atomically(out.join(SHARD_MANIFEST),
                           (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    journal.delete()
    return manifest


def _plan(config: IngestConfig) -> tuple[list[PlannedSample], list[Rejected]]:
    planned, rejected = [], []
    for item in plan_samples(config):
        if isinstance(item, Rejected):
            if config.strict:
                raise IngestError(f"{item.source}, key {item.key!r}: {item.reason}")
            rejected.append(item)
        else:
            planned.append(item)
    return planned, rejected


def _check_output(out: Location, config: IngestConfig) -> None:
    """Refuse an ``out`` whose files this run would replace but another run or tool wrote.

    Rerunning the same source resumes (or re-cuts) in place; another source's shards would be
    deleted, and a folder that is not ingest output would get shards mixed into it.
    """
    if config.overwrite or not out.exists():
        return
    if out.is_file():
        raise IngestError(f"ingest output {out} is a file, not a folder")
    if not out.fs.get_file_info(pafs.FileSelector(out.path)):
        return  # empty
    hint = "choose another --out, or pass --overwrite (ingest.overwrite) to replace it"
    recorded = _recorded_sources(out)
    if not recorded:
        raise IngestError(f"ingest output {out} is not empty and holds no `mmvq ingest` output "
                          f"(no {SHARD_MANIFEST} or journal naming a source): {hint}")
    for source in recorded:
        if not _same_place(source, config.source):
            raise IngestError(f"ingest output {out} holds shards ingested from {source}; "
                              f"ingesting {config.source} there would delete them: {hint}")


def _recorded_sources(out: Location) -> list[str]:
    """The sources named by ``out``'s manifest and journal (an unreadable one names none)."""
    sources = []
    lines = []
    for name in (SHARD_MANIFEST, JOURNAL):
        if out.join(name).is_file():
            text = out.join(name).read_bytes().decode("utf-8", "replace")
            lines.extend([text] if name == SHARD_MANIFEST else text.splitlines())
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("source"), str):
            sources.append(record["source"])
    return sources


def _same_place(a: str, b: str) -> bool:
    """Whether two sources name one place (a path and its file:// URI do)."""
    if a == b:
        return True
    try:
        x, y = resolve(a), resolve(b)
    except ValueError:
        return False
    return x.fs.type_name == y.fs.type_name and x.path.rstrip("/") == y.path.rstrip("/")


def _known_shards(out: Location) -> dict[str, dict[str, Any]]:
    """Shard records of an earlier run: its manifest if it finished, else its journal."""
    known: dict[str, dict[str, Any]] = {}
    manifest = out.join(SHARD_MANIFEST)
    if manifest.is_file():
        try:
            known.update({r["path"]: r for r in json.loads(manifest.read_bytes())["shards"]})
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: every shard is rewritten
    journal = out.join(JOURNAL)
    if journal.is_file():
        for line in journal.read_bytes().decode().splitlines():
            try:
                record = json.loads(line)
                known[record["path"]] = record
            except (ValueError, KeyError, TypeError):
                continue  # the source line, or a damaged one
    return known


def _remove_strays(out: Location, keep: set[str]) -> None:
    """Delete shards of an earlier, different plan (and temporaries of a killed run)."""
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True)):
        rel = out.relative(info.path)
        name = rel.rsplit("/", 1)[-1]
        stray_shard = re.fullmatch(r"shard-\d{6}\.tar", name) and rel not in keep
        if info.type == pafs.FileType.File and (stray_shard or re.fullmatch(r"\..*\.tmp", name)):
            out.fs.delete_file(info.path)


_QUARANTINE_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()),
                                ("stage", pa.string()), ("reason", pa.string()),
                                ("origin", pa.string())])


def _quarantine_table(rejected: list[Rejected]) -> pa.Table:
    return pa.table({"key": [r.key for r in rejected], "shard": [r.source for r in rejected],
                     "stage": ["ingest"] * len(rejected),
                     "reason": [r.reason for r in rejected],
                     "origin": [r.origin or r.source for r in rejected]},
                    schema=_QUARANTINE_SCHEMA)


def _manifest(config: IngestConfig, records: list[dict[str, Any]],
              rejected: list[Rejected]) -> dict[str, Any]:
    splits: dict[str, int] = {}
    modalities: dict[str, int] = {}
    for record in records:
        splits[record["split"]] = splits.get(record["split"], 0) + record["samples"]
        for name, n in record["modalities"].items():
            modalities[name] = modalities.get(name, 0) + n
    out = sum(splits.values())
    # source_path: where the relative origins of the samples' mmvq_origin resolve, whatever
    # the working directory of the reader (a local source as an absolute path).
    local = "://" not in config.source
    return {"version": MANIFEST_VERSION, "source": config.source, "config": to_dict(config),
            "source_path": str(Path(config.source).resolve()) if local else config.source,
            "shards": records,
            "counts": {"in": out + len(rejected), "out": out, "quarantined": len(rejected),
                       "splits": dict(sorted(splits.items())),
                       "modalities": dict(sorted(modalities.items()))}}


# ----------------------------------------------------------------------------- the stage

def run(config: IngestConfig, ctx: StageContext) -> dict[str, Any]:
    """The ``ingest`` stage: shards into the stage's output directory.

    Shards are first written to a resume directory beside the stage outputs, named by the
    config, which survives a killed run (the runner discards the stage's own temporary
    directory); a rerun continues there and the finished files are moved into the output.
    """
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()
    work = ctx.output_dir.parent / f".ingest-resume-{digest[:16]}"
    manifest = ingest(config, str(work))
    for path in sorted(work.rglob("*")):
        if path.is_file():
            target = ctx.output_dir / path.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir()
    work.rmdir()
    counts = manifest["counts"]
    print(f"ingest: in {counts['in']} = out {counts['out']} + quarantined "
          f"{counts['quarantined']}")
    if ctx.logger:
        flat = {"in": counts["in"], "out": counts["out"], "quarantined": counts["quarantined"],
                **{f"out/{k}": v for k, v in counts["splits"].items()},
                **{f"modality/{k}": v for k, v in counts["modalities"].items()}}
        ctx.logger.metrics({f"samples/{k}": v for k, v in flat.items()}, step=0)
        ctx.logger.artifact(ctx.output_dir / SHARD_MANIFEST)
        if counts["quarantined"]:
            ctx.logger.artifact(ctx.output_dir / QUARANTINE_FILE)
    return {"counts": {k: v for k, v in counts.items() if k != "modalities"}}


# ----------------------------------------------------------------------------- command line

# The parser lives in workflows.cli (so `mmvq --help` imports none of this); this runs it.

def cmd_ingest(args: Any) -> int:
    """Run ``mmvq ingest``; an error is printed to stderr and gives exit status 1."""
    try:
        config = IngestConfig(source=args.source, format=args.format,
                              max_samples_per_shard=args.max_samples,
                              max_bytes_per_shard=args.max_bytes,
                              default_split=args.default_split, strict=args.strict,
                              val_fraction=args.val_fraction,
                              overwrite=args.overwrite, allow_outside=args.allow_outside,
                              max_member_bytes=args.max_member_bytes)
    except ValueError as err:  # a flag value out of range: a message, not a traceback
        return _fail(err)
    try:
        manifest = ingest(config, args.out)
    except IngestError as err:
        return _fail(err)
    counts = manifest["counts"]
    print(f"wrote {len(manifest['shards'])} shards to {args.out}: splits {counts['splits']}, "
          f"modalities {counts['modalities']}")
    print(f"in {counts['in']} = out {counts['out']} + quarantined {counts['quarantined']}"
          + (f" (reasons in {args.out}/{QUARANTINE_FILE})" if counts["quarantined"] else ""))
    return 0


def _fail(err: Exception) -> int:
    print(f"mmvq ingest: {err}", file=sys.stderr)
    return 1
