"""Shard members: names, extensions, split names and the checked webdataset tar reader.

The contract of DESIGN.md's *shard sample*: ``__key__`` unique in the dataset, the members of one
key contiguous in the tar, extensions image ``jpg|jpeg|png|webp``, audio ``flac|wav|ogg|mp3``,
text ``txt``, and ``json`` metadata. Ingest writes shards by it; preprocess, the BPE fit and the
data-plane benchmark read them with :func:`read_samples`. Standard library only, so that a Ray
read task unpickling the reader imports nothing heavy.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

# A split is a directory name in every stage's output (ROOT/SPLIT/): plain characters only.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
TEXT_EXTENSIONS = ("txt",)
EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "text": TEXT_EXTENSIONS}
MODALITY_OF = {**{e: "image" for e in IMAGE_EXTENSIONS}, **{e: "audio" for e in AUDIO_EXTENSIONS},
               **{e: "text" for e in TEXT_EXTENSIONS}, "json": "json"}
# The member columns a reader produces (anything else in a sample is not used downstream).
MEMBER_COLUMNS = (*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS, *TEXT_EXTENSIONS, "json")
# Beside the split directories of shards that synth or ingest wrote: counts and per-shard sha256
# (and ingest's source, which preprocess's quarantine table resolves origins against).
SHARD_MANIFEST = "manifest.json"
# The quarantine table (key, shard, stage, reason, origin) of a stage that rejects samples.
QUARANTINE_FILE = "quarantine.parquet"
# The json field with each sample's original source and files (written by ingest, read by
# preprocess for its quarantine table).
ORIGIN_FIELD = "mmvq_origin"


def split_name(name: str) -> tuple[str | None, str | None]:
    """Member name -> (key, extension) by the webdataset rule: the key ends at the first ``.``
    of the last path component (``dir/a.seg.png`` -> ``dir/a``, ``seg.png``).

    The extension is lower-cased so ``A.JPG`` is an image; ``(None, None)`` if there is none.
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def split_stem(name: str) -> tuple[str | None, str | None]:
    """File name in a folder source -> (stem, extension): the stem ends at the *last* ``.`` of
    the last path component (``dir/IMG_1.final.JPG`` -> ``dir/IMG_1.final``, ``jpg``).

    A user's file name is not a member name: the dots before its suffix are part of the name.
    The extension is lower-cased; ``(None, None)`` if there is none.
    """
    match = re.match(r"^((?:.*/)?[^/]+)[.]([^./]+)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def shard_key(name: str) -> str:
    """A sample's name (folder stem or manifest key) -> its key in the shards.

    Readers would split a ``.`` in the last component into key and extension, so there it
    becomes ``_`` (``dir/IMG_1.final`` -> ``dir/IMG_1_final``); folders and manifests map alike.
    """
    head, sep, last = name.rpartition("/")
    return f"{head}{sep}{last.replace('.', '_')}"


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


class EndRecorder(tarfile.TarInfo):
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


def end_problem(tar: tarfile.TarFile, last: str | None) -> str | None:
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
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=EndRecorder)  # noqa: SIM115
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
            problem = member_problem(info, ext, current.members, max_member_bytes)
            if problem:
                current.error = current.error or problem
                continue
            current.members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"shard truncated or corrupt at member {last!r}: {err}"
        yield _with_error(current, shard, reason)
        return
    problem = end_problem(tar, last)
    if problem:  # the last sample may have lost members after the cut: do not trust it
        yield _with_error(current, shard, problem)
    elif current is not None:
        yield current


def member_problem(info: tarfile.TarInfo, ext: str, members: dict[str, bytes],
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



# The compressions tarfile's "r|*" mode detects and undoes, by their magic bytes (the checks of
# tarfile._StreamProxy.getcomptype, so that whatever tarfile would decompress is caught here).
_SNIFF_BYTES = 10


def compression_of(head: bytes) -> str | None:
    """The compression a stream starting with ``head`` has for tarfile, or None (a plain tar)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[0:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return "xz"
    return None


class _Replayed:
    """A read-once stream whose first bytes, already read to sniff it, are read again."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.rest.read(size - len(data)) if len(data) < size else data


def read_samples(stream: IO[bytes], shard: str,
                 allow_compressed: bool = False) -> Iterator[RawSample]:
    """:func:`read_shard`, but a compressed tar is refused unless ``allow_compressed``.

    A refused shard yields one sample with an empty key and the reason, as :func:`read_shard`
    reports a shard that is not a tar; only its first bytes are read.
    """
    head = b""
    try:
        while len(head) < _SNIFF_BYTES and (more := stream.read(_SNIFF_BYTES - len(head))):
            head += more
    except OSError as err:  # what read_shard says when opening the tar fails the same way
        yield RawSample("", shard, error=f"shard is not a readable tar: {err}")
        return
    kind = compression_of(head)
    if kind is not None and not allow_compressed:
        yield RawSample("", shard, error=(
            f"shard is {kind}-compressed, refused: a compressed tar can expand a thousandfold; "
            "set preprocess.allow_compressed_shards to read shards from a trusted source"))
        return
    yield from read_shard(_Replayed(head, stream), shard)
