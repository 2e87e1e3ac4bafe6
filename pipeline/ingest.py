"""Ingest stage: users' aligned data -> validated webdataset shards plus a manifest.

Three sources, one output. A *folder* of files sharing a stem (``a.jpg``, ``a.flac``, ``a.txt``,
``a.json``; the key is the path without extensions), a *CSV/JSONL manifest* (one row per sample:
``key``, ``image``, ``audio``, ``text`` or ``text_path``, ``split``, anything else becomes json
metadata), or existing *shards* written by any tool. The output is
``{out}/{split}/shard-NNNNNN.tar`` with every key's members contiguous and every key unique,
``quarantine.parquet`` (``key``, ``shard``, ``stage``, ``reason``) for what could not be taken,
and ``manifest.json`` (shards with sample count, bytes and sha256; counts per split and per
modality; ``in = out + quarantined``).

Ingest checks containers, not content: it never decodes an image (preprocess does, and
quarantines what does not decode). What it refuses: duplicate keys (the first is kept, later ones
are quarantined naming the first), unsafe member names (absolute or ``..``), keys with a ``.`` in
their last part (readers would split them), missing or truncated files, links, duplicate members,
json that does not parse, split names that are not plain words. Members of one key that are
scattered through an input shard are merged (repaired).

Writing is resumable: the plan (which sample goes to which shard) is computed from names and
sizes before any content is read, and is the same on every run with the same inputs and config.
Each shard is written under a temporary name, moved into place, and recorded with the digest of
its plan and its sha256 in a journal; a rerun keeps every shard whose plan and sha256 match and
writes the rest, so the result is byte-identical to an uninterrupted run.

The stream reader used by preprocess (:func:`read_shard`) lives here too: it is where the
contiguity of keys is checked when shards are read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import to_dict
from pipeline.stage import StageContext
from pipeline.storage import Location, resolve, write_bytes_atomically, write_with

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
TEXT_EXTENSIONS = ("txt",)
MODALITY_OF = {**{e: "image" for e in IMAGE_EXTENSIONS}, **{e: "audio" for e in AUDIO_EXTENSIONS},
               **{e: "text" for e in TEXT_EXTENSIONS}, "json": "json"}
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"
JOURNAL = ".ingest-journal.jsonl"
MANIFEST_VERSION = 1
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Tar headers carry no time, owner or host, so the same samples give the same bytes.
_TAR_MTIME = 0
_TAR_OWNER = "mmvq"


class IngestError(RuntimeError):
    """Ingest cannot go on (strict mode, unreadable source); the message names file and key."""


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how to cut it into shards."""

    # Folder, CSV/JSONL manifest file, or folder of .tar shards: a path or URI (s3://, file://).
    source: str = ""
    # How to read ``source``; "auto" picks csv/jsonl by the file suffix, shards if the folder
    # holds .tar files, else folder.
    format: Literal["auto", "folder", "csv", "jsonl", "shards"] = "auto"
    # A shard closes at this many samples. Thousands of samples per shard is the usual
    # webdataset size; the demo's small default keeps several shards per split.
    max_samples_per_shard: int = 1000
    # ... or before it would pass this many bytes (0: no byte limit). ~256 MB shards stream well
    # from object stores; a single larger sample gets a shard of its own.
    max_bytes_per_shard: int = 256 * 1024 * 1024
    default_split: str = "train"  # for samples whose row/json names no split
    strict: bool = False  # fail on the first sample that would be quarantined

    def __post_init__(self) -> None:
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got "
                             f"{self.max_samples_per_shard}")
        if self.max_bytes_per_shard < 0:
            raise ValueError(f"max_bytes_per_shard must be >= 0, got {self.max_bytes_per_shard}")
        if not _SPLIT_NAME.match(self.default_split):
            raise ValueError(f"default_split {self.default_split!r} is not a plain name")


# ----------------------------------------------------------------------------- names

def split_name(name: str) -> tuple[str | None, str | None]:
    """Member name -> (key, extension) by the webdataset rule: the key ends at the first ``.``
    of the last path component (``dir/a.seg.png`` -> ``dir/a``, ``seg.png``).

    The extension is lower-cased so ``A.JPG`` is an image; ``(None, None)`` if there is none.
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def unsafe_name(name: str) -> str | None:
    """Why a member or key name must not be used (absolute, ``..``, backslash, NUL), or None."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"unsafe member name {name!r}: absolute path"
    if "\\" in name or "\x00" in name:
        return f"unsafe member name {name!r}: backslash or NUL"
    if ".." in name.split("/"):
        return f"unsafe member name {name!r}: '..' component"
    return None


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a sample in a shard, or None."""
    if not key or key.endswith("/"):
        return f"key {key!r} is empty"
    if "." in key.rsplit("/", 1)[-1]:
        return f"key {key!r} contains '.': readers would split it into key and extension"
    return unsafe_name(key)


# ----------------------------------------------------------------------------- reading shards

@dataclass
class RawSample:
    """One sample as read from a shard: member bytes by extension, or why it is unusable."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


class _EndRecorder(tarfile.TarInfo):
    """Records the header error that ended a tar walk.

    tarfile stops silently at a truncated or invalid header after the first member, so without
    this a shard cut at a member boundary reads as a shorter valid shard and samples vanish.
    Only the end-of-archive marker (a zero block, ``EOFHeaderError``) is a proper end.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as err:
            tarfile_.mmvq_end = err  # type: ignore[attr-defined]
            raise


def _end_problem(tar: tarfile.TarFile, last: str | None) -> str | None:
    end = getattr(tar, "mmvq_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    where = f"after member {last!r}" if last else "before the first member"
    return f"shard truncated or corrupt {where}: no end-of-archive marker ({end or 'EOF'})"


def read_shard(stream: IO[bytes], shard: str,
               max_member_bytes: int = 1 << 30) -> Iterator[RawSample]:
    """Stream a webdataset tar into samples, checking what readers usually take on trust.

    Consecutive members with the same key form a sample. A key that appears again after another
    key (out-of-order members, which split one sample in two for a plain reader) marks the later
    run with an error; the caller also sees the earlier run and must quarantine both (the stage
    does: a key occurring twice is never passed on). Unsafe names, links, duplicate members,
    oversized members and truncation mark the sample they hit. A shard that is not a tar at all
    yields one sample with an empty key and the reason.

    Parameters
    ----------
    stream : the shard's bytes, read once from start to end.
    shard : its name or URI, copied into every sample for the quarantine table.
    max_member_bytes : members larger than this are not read (and the sample is marked).
    """
    try:
        # Not a context manager: closing the TarFile would close the caller's stream.
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecorder)  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as err:
        yield RawSample("", shard, error=f"shard is not a readable tar: {err}")
        return
    seen: set[str] = set()
    current: RawSample | None = None
    last = None
    try:
        for info in tar:
            if info.isdir():
                continue
            last = info.name
            key, ext = split_name(info.name)
            if key is None:
                if current is not None:
                    yield current
                current = RawSample(info.name, shard, error=f"member {info.name!r} has no "
                                    "extension, so it belongs to no sample")
                continue
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key, shard)
                if key in seen:
                    current.error = (f"members of key {key!r} are not contiguous in the shard "
                                     "(another run of them came earlier); `mmvq ingest` with "
                                     "format=shards merges them")
                seen.add(key)
            problem = _member_problem(info, ext, current.members, max_member_bytes)
            if problem:
                current.error = current.error or problem
                continue
            current.members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"shard truncated or corrupt at member {last!r}: {err}"
        yield _with_error(current, shard, reason)
        return
    problem = _end_problem(tar, last)
    if problem:  # the last sample may have lost members after the cut: do not trust it
        yield _with_error(current, shard, problem)
    elif current is not None:
        yield current


def _member_problem(info: tarfile.TarInfo, ext: str, members: dict[str, bytes],
                    max_member_bytes: int) -> str | None:
    if problem := unsafe_name(info.name):
        return problem
    if not info.isreg():
        return f"member {info.name!r} is a link or device, not a regular file"
    if ext in members:
        return f"duplicate member {info.name!r}"
    if info.size > max_member_bytes:
        return f"member {info.name!r} has {info.size} bytes, over the {max_member_bytes} limit"
    return None


def _with_error(sample: RawSample | None, shard: str, reason: str) -> RawSample:
    if sample is None:
        return RawSample("", shard, error=reason)
    sample.error = sample.error or reason
    return sample


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
class PlannedSample:
    key: str
    split: str
    members: tuple[MemberRef, ...]
    source: str  # the file/row it came from, for messages


@dataclass(frozen=True)
class Rejected:
    key: str
    source: str
    reason: str


def plan_samples(config: IngestConfig) -> Iterator[PlannedSample | Rejected]:
    """The samples of ``config.source`` in a fixed order, or why each rejected one was.

    Only names, sizes and json metadata are read here; content is read when writing.
    """
    source = resolve(config.source)
    fmt = _detect_format(config.format, source)
    raw = {"folder": _plan_folder, "csv": _plan_table, "jsonl": _plan_table,
           "shards": _plan_shards}[fmt](source, config, fmt)
    first_seen: dict[str, str] = {}
    for item in raw:
        if isinstance(item, PlannedSample):
            if item.key in first_seen:
                item = Rejected(item.key, item.source,
                                f"duplicate key {item.key!r} (first taken from "
                                f"{first_seen[item.key]})")
            else:
                first_seen[item.key] = item.source
        yield item


def _detect_format(fmt: str, source: Location) -> str:
    if not source.exists():
        raise IngestError(f"ingest source {source} does not exist")
    if fmt != "auto":
        return fmt
    if source.is_file():
        suffix = posixpath.splitext(source.path)[1].lower()
        if suffix in (".csv", ".jsonl"):
            return suffix[1:]
        raise IngestError(f"ingest source {source}: cannot tell the format from suffix "
                          f"{suffix!r}; set format to csv or jsonl")
    return "shards" if source.files((".tar",)) else "folder"


def _plan_folder(source: Location, config: IngestConfig, _fmt: str,
                 ) -> Iterator[PlannedSample | Rejected]:
    groups: dict[str, list[tuple[str, Any]]] = {}
    for info in source.files():
        rel = source.relative(info.path)
        key, ext = split_name(rel)
        if key is None:
            yield Rejected(rel, source.join(rel).uri, f"file {rel!r} has no extension")
            continue
        groups.setdefault(key, []).append((ext, info))
    for key in sorted(groups):
        where = source.join(key).uri
        members = tuple(MemberRef(ext, info.size, Location(source.fs, info.path,
                                                           source.join(f"{key}.{ext}").uri))
                        for ext, info in sorted(groups[key], key=lambda m: m[0]))
        yield _finish_sample(key, members, None, where, config)


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
        try:
            yield _row_sample(row, base, where, config)
        except _RowError as err:
            yield Rejected(str(row.get("key") or ""), where, str(err))


class _RowError(ValueError):
    pass


def _json_row(line: str, source: Location, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return {"__error__": f"line {number} is not JSON: {err}"}
    return row if isinstance(row, dict) else {"__error__": f"line {number} is not an object"}


def _row_sample(row: dict[str, Any], base: Location, where: str,
                config: IngestConfig) -> PlannedSample | Rejected:
    if "__error__" in row:
        raise _RowError(row["__error__"])
    key = str(row.get("key") or "").strip()
    if problem := key_problem(key):
        raise _RowError(problem)
    members = []
    for column, allowed in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS),
                            ("text_path", TEXT_EXTENSIONS)):
        if value := str(row.get(column) or "").strip():
            members.append(_file_member(value, base, column, allowed))
    if text := str(row.get("text") or ""):
        if any(m.ext == "txt" for m in members):
            raise _RowError("both text and text_path are given")
        members.append(MemberRef("txt", len(text.encode()), data=text.encode()))
    split = str(row.get("split") or "").strip() or config.default_split
    extra = {k: v for k, v in row.items()
             if k not in ("key", "image", "audio", "text", "text_path", "split")
             and v not in (None, "")}
    data = json.dumps({**extra, "split": split}, sort_keys=True, ensure_ascii=False).encode()
    members.append(MemberRef("json", len(data), data=data))
    return _finish_sample(key, tuple(sorted(members, key=lambda m: m.ext)), split, where, config)


def _file_member(value: str, base: Location, column: str,
                 allowed: tuple[str, ...]) -> MemberRef:
    location = resolve(value) if "://" in value or value.startswith("/") else base.join(value)
    ext = posixpath.splitext(location.path)[1].lower().lstrip(".")
    if ext not in allowed:
        raise _RowError(f"{column}: {value!r} has extension {ext!r}, not one of "
                        f"{'|'.join(allowed)}")
    info = location.fs.get_file_info(location.path)
    if info.type != pafs.FileType.File:
        raise _RowError(f"{column}: file {location} not found")
    return MemberRef(ext, info.size, location)


def _plan_shards(source: Location, config: IngestConfig, _fmt: str,
                 ) -> Iterator[PlannedSample | Rejected]:
    for info in source.files((".tar",)):
        shard = Location(source.fs, info.path, source.join(source.relative(info.path)).uri)
        yield from _index_shard(shard, info.size, config)


def _index_shard(shard: Location, size: int, config: IngestConfig,
                 ) -> Iterator[PlannedSample | Rejected]:
    """Group a shard's members by key from its headers (seeking over the data), merging
    out-of-order runs of a key; members are read later by byte range."""
    groups: dict[str, list[tarfile.TarInfo]] = {}
    errors: dict[str, str] = {}
    infos: list[tarfile.TarInfo] = []
    with shard.fs.open_input_file(shard.path) as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:", tarinfo=_EndRecorder)  # noqa: SIM115
            infos.extend(i for i in tar if not i.isdir())
            problem = _end_problem(tar, infos[-1].name if infos else None)
        except (tarfile.TarError, OSError, EOFError) as err:
            if not infos:
                yield Rejected("", shard.uri, f"shard is not a readable tar: {err}")
                return
            problem = f"shard truncated or corrupt after member {infos[-1].name!r}: {err}"
    for info in infos:
        key, ext = split_name(info.name)
        if key is None:
            yield Rejected(info.name, shard.uri, f"member {info.name!r} has no extension")
            continue
        members = groups.setdefault(key, [])
        bad = (_member_problem(info, ext, {split_name(m.name)[1]: b"" for m in members}, size + 1)
               or (info.offset_data + info.size > size
                   and f"member {info.name!r} is cut off by the end of the file")
               or key_problem(key))
        if bad and key not in errors:
            errors[key] = bad
        members.append(info)
    if problem and infos:  # the last sample may have lost members
        errors.setdefault(split_name(infos[-1].name)[0] or infos[-1].name, problem)
    for key, infos_of_key in groups.items():
        if key in errors:
            yield Rejected(key, shard.uri, errors[key])
            continue
        refs = tuple(MemberRef(split_name(i.name)[1], i.size, shard, i.offset_data)
                     for i in sorted(infos_of_key, key=lambda i: split_name(i.name)[1]))
        yield _finish_sample(key, refs, None, shard.uri, config)


def _finish_sample(key: str, members: tuple[MemberRef, ...], split: str | None, where: str,
                   config: IngestConfig) -> PlannedSample | Rejected:
    """Check the key, read the split from the json member (adding one if absent)."""
    if problem := key_problem(key):
        return Rejected(key, where, problem)
    if not members:
        return Rejected(key, where, "no members")
    if split is None:
        meta = next((m for m in members if m.ext == "json"), None)
        split = config.default_split
        if meta is None:
            data = json.dumps({"split": split}).encode()
            members = (*members, MemberRef("json", len(data), data=data))
        else:
            try:
                parsed = json.loads(_read_member(meta))
                split = str(parsed.get("split", split))
            except (ValueError, AttributeError) as err:
                return Rejected(key, where, f"json: does not parse ({err})")
    if not _SPLIT_NAME.match(split):
        return Rejected(key, where, f"split {split!r} is not a plain name ([A-Za-z0-9_-]+)")
    return PlannedSample(key, split, members, where)


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


def ingest(config: IngestConfig, out: str | Location,
           on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ingest ``config.source`` into shards under ``out``; resumes a previous partial run.

    Parameters
    ----------
    config : what to read and how to shard it.
    out : output directory, a path or URI.
    on_shard : called with each shard's record after it is committed (progress, tests).

    Returns
    -------
    The manifest (also written to ``out/manifest.json``).

    Raises
    ------
    IngestError
        In strict mode, at the first rejected sample, naming its source, key and reason.
    """
    out = resolve(out) if not isinstance(out, Location) else out
    out.mkdir()
    planned, rejected = [], []
    for item in plan_samples(config):
        if isinstance(item, Rejected):
            if config.strict:
                raise IngestError(f"{item.source}, key {item.key!r}: {item.reason}")
            rejected.append(item)
        else:
            planned.append(item)
    plans = pack(planned, config.max_samples_per_shard, config.max_bytes_per_shard)
    known = _known_shards(out)
    journal = out.join(JOURNAL)
    journal_lines = []
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
    write_with(out.join(QUARANTINE), lambda stream: pq.write_table(_quarantine_table(rejected),
                                                                   stream))
    manifest = _manifest(config, records, rejected)
    write_bytes_atomically(out.join(MANIFEST),
                           (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    journal.delete()
    return manifest


def _known_shards(out: Location) -> dict[str, dict[str, Any]]:
    """Shard records of an earlier run: its manifest if it finished, else its journal."""
    known: dict[str, dict[str, Any]] = {}
    manifest = out.join(MANIFEST)
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
                continue
    return known


def _remove_strays(out: Location, keep: set[str]) -> None:
    """Delete shards of an earlier, different plan (and temporaries of a killed run)."""
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True)):
        rel = out.relative(info.path)
        name = rel.rsplit("/", 1)[-1]
        stray_shard = re.fullmatch(r"shard-\d{6}\.tar", name) and rel not in keep
        if info.type == pafs.FileType.File and (stray_shard or re.fullmatch(r"\..*\.tmp", name)):
            out.fs.delete_file(info.path)


def _quarantine_table(rejected: list[Rejected]) -> pa.Table:
    return pa.table({"key": [r.key for r in rejected], "shard": [r.source for r in rejected],
                     "stage": ["ingest"] * len(rejected),
                     "reason": [r.reason for r in rejected]},
                    schema=pa.schema([("key", pa.string()), ("shard", pa.string()),
                                      ("stage", pa.string()), ("reason", pa.string())]))


def _manifest(config: IngestConfig, records: list[dict[str, Any]],
              rejected: list[Rejected]) -> dict[str, Any]:
    splits: dict[str, int] = {}
    modalities: dict[str, int] = {}
    for record in records:
        splits[record["split"]] = splits.get(record["split"], 0) + record["samples"]
        for name, n in record["modalities"].items():
            modalities[name] = modalities.get(name, 0) + n
    out = sum(splits.values())
    return {"version": MANIFEST_VERSION, "source": config.source, "config": to_dict(config),
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
    if not config.source:
        raise IngestError("ingest.source is empty: name a folder, CSV/JSONL manifest or shards")
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
        ctx.logger.artifact(ctx.output_dir / MANIFEST)
        if counts["quarantined"]:
            ctx.logger.artifact(ctx.output_dir / QUARANTINE)
    return {"counts": {k: v for k, v in counts.items() if k != "modalities"}}


# ----------------------------------------------------------------------------- command line

# The parser lives in pipeline.cli (so `mmvq --help` imports none of this); this runs it.

def cmd_ingest(args: Any) -> int:
    config = IngestConfig(source=args.source, format=args.format,
                          max_samples_per_shard=args.max_samples,
                          max_bytes_per_shard=args.max_bytes, default_split=args.default_split,
                          strict=args.strict)
    try:
        manifest = ingest(config, args.out)
    except IngestError as err:
        print(f"mmvq ingest: {err}")
        return 1
    counts = manifest["counts"]
    print(f"wrote {len(manifest['shards'])} shards to {args.out}: splits {counts['splits']}, "
          f"modalities {counts['modalities']}")
    print(f"in {counts['in']} = out {counts['out']} + quarantined {counts['quarantined']}"
          + (f" (reasons in {args.out}/{QUARANTINE})" if counts["quarantined"] else ""))
    return 0
