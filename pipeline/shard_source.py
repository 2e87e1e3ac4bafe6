"""Ray Data source of webdataset shards: whole tars read with the checks of
:func:`pipeline.ingest.read_shard`, cut into Arrow blocks of raw member bytes.

A compressed tar (gzip, bzip2, xz: what tarfile would undo by itself) is refused unless
configured, the way a shard that is not a tar is reported: one sample with an empty key and
the reason, so the stage quarantines one row naming the shard. A few KiB of gzip can expand
to hundreds of MiB of members.

A module of its own, importing only pyarrow, Ray Data's datasource base and the tar reader: the
read tasks that unpickle it must not pay for torch, torchaudio and Pillow, which only the
preprocessing actors use (:mod:`pipeline.preprocess`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any, ClassVar

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.ingest import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    RawSample,
    read_shard,
)

# The member columns the reader produces (anything else in a sample is not used downstream).
MEMBER_COLUMNS = (*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS, *TEXT_EXTENSIONS, "json")
_ROW_SCHEMA = pa.schema([("__key__", pa.string()), ("__url__", pa.string()),
                         ("__error__", pa.string()),
                         *((name, pa.binary()) for name in MEMBER_COLUMNS)])


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


def samples_to_table(samples: list[RawSample]) -> pa.Table:
    """Raw samples -> one Arrow block with a fixed schema (absent members are null)."""
    columns: dict[str, list[Any]] = {
        "__key__": [s.key for s in samples], "__url__": [s.shard for s in samples],
        "__error__": [s.error for s in samples]}
    for name in MEMBER_COLUMNS:
        columns[name] = [s.members.get(name) for s in samples]
    return pa.table(columns, schema=_ROW_SCHEMA)


class ShardDatasource(FileBasedDatasource):
    """Ray Data source of webdataset shards, read with the checks of :func:`read_shard`.

    One read task streams whole tars (a shard is never split), so the contiguity check sees
    every member of a shard in order. Blocks are cut every ``rows_per_block`` samples. A
    compressed tar is one refused sample unless ``allow_compressed`` (:func:`read_samples`).
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["tar"]  # what the base class lists in a folder

    def __init__(self, paths: list[str], rows_per_block: int = 32,
                 allow_compressed: bool = False, **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.allow_compressed = allow_compressed

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        batch: list[RawSample] = []
        for sample in read_samples(f, path, self.allow_compressed):
            batch.append(sample)
            if len(batch) == self.rows_per_block:
                yield samples_to_table(batch)
                batch = []
        if batch:
            yield samples_to_table(batch)
