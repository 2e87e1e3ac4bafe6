"""Where data lives: local paths and object stores behind one pyarrow filesystem interface.

A location is a string: a local path (``runs/demo/shards``), a ``file://`` URI, or an object
store URI (``s3://bucket/prefix``, and whatever else :func:`pyarrow.fs.FileSystem.from_uri`
understands). :func:`resolve` turns it into a :class:`Location` (filesystem + path) that the
ingest and preprocess stages read and write through, so the same code serves a laptop and a
cluster whose shards sit in S3.

S3-compatible stores (MinIO, Ceph, R2, moto) take their endpoint from the URI query
(``s3://bucket/x?endpoint_override=http://127.0.0.1:9000``) or from the standard environment
variables ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials come from the usual AWS
chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles,
instance roles), which pyarrow's S3 client reads itself.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from pipeline.formats.shards import SHARD_MANIFEST

# S3FileSystem options that may be given in the URI query (strings as in the URI).
_S3_QUERY_OPTIONS = ("endpoint_override", "region", "scheme", "access_key", "secret_key",
                     "session_token", "force_virtual_addressing")


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem: ``fs`` plus a path in that filesystem's syntax.

    ``uri`` is what the user wrote, kept for messages and manifests.
    """

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem) or (
            isinstance(self.fs, pafs.SubTreeFileSystem)
            and isinstance(self.fs.base_fs, pafs.LocalFileSystem))

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one (``/``-separated on every filesystem)."""
        path = posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts)
        return Location(self.fs, path, _join_uri(self.uri, *parts))

    def parent(self) -> Location:
        """The directory holding this location."""
        base, sep, query = self.uri.partition("?")
        uri = base.rstrip("/").rsplit("/", 1)[0] if "/" in base.rstrip("/") else "."
        return Location(self.fs, posixpath.dirname(self.path), f"{uri}?{query}" if sep else uri)

    def relative(self, path: str) -> str:
        """``path`` (in this filesystem) relative to this location."""
        return posixpath.relpath(path, self.path) if self.path else path

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def files(self, suffixes: tuple[str, ...] = ()) -> list[pafs.FileInfo]:
        """Every file below this directory (recursively), sorted by path; hidden files skipped.

        Parameters
        ----------
        suffixes : only names ending in one of these (e.g. ``(".tar",)``); all when empty.
        """
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File
                       and not any(p.startswith(".") for p in self.relative(i.path).split("/"))
                       and (not suffixes or i.path.endswith(suffixes))), key=lambda i: i.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``: one ranged read on an object store."""
        with self.fs.open_input_file(self.path) as handle:
            return handle.read_at(size, offset)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes, streamed."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def __str__(self) -> str:
        return self.uri


def resolve(location: str | os.PathLike[str]) -> Location:
    """A local path or URI -> :class:`Location`.

    Raises
    ------
    ValueError
        For a URI whose scheme pyarrow does not support, naming it.
    """
    text = os.fspath(location)
    parts = urlsplit(text)
    if len(parts.scheme) <= 1:  # no scheme, or a Windows drive letter: a local path
        return Location(pafs.LocalFileSystem(), str(Path(text).absolute().as_posix()), text)
    if parts.scheme == "s3":
        return Location(_s3(parts.query), f"{parts.netloc}{parts.path}".rstrip("/"),
                        text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise ValueError(f"cannot open {text!r}: {err}") from err
    return Location(fs, path.rstrip("/") or path, text)


def _s3(query: str) -> pafs.S3FileSystem:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query):
        if name not in _S3_QUERY_OPTIONS:
            raise ValueError(f"unknown S3 URI option {name!r} (known: "
                             f"{', '.join(_S3_QUERY_OPTIONS)})")
        options[name] = value == "true" if name == "force_virtual_addressing" else value
    # The AWS SDKs' own names for a custom endpoint; pyarrow does not read them in every version.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in options:
        options["endpoint_override"] = endpoint
    # Explicit keys travel with the filesystem when Ray pickles it to a worker whose
    # environment may differ; without them each process asks the AWS chain itself.
    for option, variable in (("access_key", "AWS_ACCESS_KEY_ID"),
                             ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                             ("session_token", "AWS_SESSION_TOKEN")):
        if os.environ.get(variable) and option not in options:
            options[option] = os.environ[variable]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "region" not in options:
        options["region"] = region
    return pafs.S3FileSystem(**options)


@contextmanager
def atomic_writer(target: Location) -> Iterator[IO[bytes]]:
    """Write ``target`` under a temporary name and move it into place only on success.

    A reader never sees a half-written file: on a local disk the move is a rename; on an object
    store the object appears when its upload completes, and the temporary object is deleted.
    The temporary name starts with ``.`` so listings skip it.
    """
    parent, name = posixpath.split(target.path)
    tmp = Location(target.fs, posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp"),
                   target.uri + ".tmp")
    target.fs.create_dir(parent, recursive=True)
    try:
        with target.fs.open_output_stream(tmp.path) as stream:
            yield stream
        target.fs.move(tmp.path, target.path)
    except BaseException:
        if tmp.exists():
            tmp.delete()
        raise


def write_bytes_atomically(target: Location, data: bytes) -> None:
    with atomic_writer(target) as stream:
        stream.write(data)


def write_with(target: Location, write: Callable[[IO[bytes]], Any]) -> Any:
    """``write(stream)`` into ``target`` atomically; returns what ``write`` returns."""
    with atomic_writer(target) as stream:
        return write(stream)


def _join_uri(uri: str, *parts: str) -> str:
    base, sep, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if sep else joined


def listing_fingerprint(location: str, suffixes: tuple[str, ...]) -> str:
    """16-hex id of the ``suffixes`` files under ``location`` (a folder or prefix, or one file).

    Data that no stage of ours committed (a user's shard folder) has no stage record to take a
    fingerprint from. Its files' names, sizes and modification times stand in for content: a
    rewritten or added shard changes the id, and computing it reads no data, so it costs the
    same for a million samples as for ten. A ``manifest.json`` beside them (``mmvq ingest``'s)
    adds its sha256s, which also catch a rewrite that kept size and time.

    Raises
    ------
    FileNotFoundError
        If there are no such files, naming the location and the suffixes.
    """
    place = resolve(location)
    if place.is_file():
        infos = [place.fs.get_file_info(place.path)] if place.path.endswith(suffixes) else []
        base = place.parent()
    else:
        infos = place.files(suffixes) if place.is_dir() else []
        base = place
    if not infos:
        raise FileNotFoundError(f"no {'|'.join(suffixes)} files under {location}")
    digest = hashlib.sha256()
    for info in infos:
        mtime = info.mtime_ns if info.mtime_ns is not None else ""
        digest.update(f"{base.relative(info.path)}\0{info.size}\0{mtime}\n".encode())
    manifest = base.join(SHARD_MANIFEST)
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    return digest.hexdigest()[:16]
