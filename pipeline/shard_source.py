"""Ray Data source of webdataset shards: whole tars read with the checks of
:func:`pipeline.formats.shards.read_shard`, cut into Arrow blocks of raw member bytes.

A compressed tar (gzip, bzip2, xz: what tarfile would undo by itself) is refused unless
configured, the way a shard that is not a tar is reported: one sample with an empty key and
the reason, so the stage quarantines one row naming the shard. A few KiB of gzip can expand
to hundreds of MiB of members.

A module of its own, importing only pyarrow, Ray Data's datasource base and the tar reader: the
read tasks that unpickle it must not pay for torch, torchaudio and Pillow. Preprocess fits its
BPE vocabulary on the captions read through it (``pipeline.preprocess.fit_text_vocab``: text
only, no decoding); the preprocessing itself reads each shard inside its actor
(``pipeline.preprocess.ShardPreprocessor``), where handing raw members over from read tasks
cost more than decoding them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.formats.shards import MEMBER_COLUMNS, RawSample, read_samples

_ROW_SCHEMA = pa.schema([("__key__", pa.string()), ("__url__", pa.string()),
                         ("__error__", pa.string()),
                         *((name, pa.binary()) for name in MEMBER_COLUMNS)])


def samples_to_table(samples: list[RawSample]) -> pa.Table:
    """Raw samples -> one Arrow block with a fixed schema (absent members are null)."""
    columns: dict[str, list[Any]] = {
        "__key__": [s.key for s in samples], "__url__": [s.shard for s in samples],
        "__error__": [s.error for s in samples]}
    for name in MEMBER_COLUMNS:
        columns[name] = [s.members.get(name) for s in samples]
    return pa.table(columns, schema=_ROW_SCHEMA)


class ShardDatasource(FileBasedDatasource):
    """Ray Data source of webdataset shards, read with the checks of :func:`pipeline.formats.shards.read_shard`.

    One read task streams whole tars (a shard is never split), so the contiguity check sees
    every member of a shard in order. Blocks are cut every ``rows_per_block`` samples. A
    compressed tar is one refused sample unless ``allow_compressed`` (:func:`pipeline.formats.shards.read_samples`).
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
