"""Streaming writes of a Ray Dataset into one parquet directory per split.

``Dataset.write_parquet`` writes one flat directory, so a stage with several splits used to
either materialize everything (to filter it once per split) or run one pipeline per split
(paying actor start-up and model loading once per split). :class:`SplitParquetSink` writes each
block's rows into ``ROOT/SPLIT/`` as they arrive, so nothing is held beyond Ray Data's own
bounded buffers and every split comes out of one pass.

Rows may carry a ``status`` column ("ok" or a quarantine reason). Only ``ok`` rows go to the
data files; every row's small bookkeeping columns (:data:`STATUS_COLUMNS`) also go to
``ROOT/.status/``, which is all the stage needs afterwards to count, find repeated keys and
build its quarantine table: keys and reasons, never the decoded tensors.

A write task that fails and is retried leaves files of its first attempt behind; each task
writes under a fresh name and reports what it wrote, and :meth:`on_write_complete` deletes
every file no successful task reported, so a retry never duplicates rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

STATUS_DIR = ".status"
# The per-row bookkeeping kept for every row (ok or not); absent columns are skipped.
STATUS_COLUMNS = ("key", "split", "status", "source_shard", "origin")


class SplitParquetSink(Datasink):
    """Writes ``ok`` rows to ``root/SPLIT/*.parquet`` and every row's status to ``root/.status``.

    Parameters
    ----------
    root : local (or mounted shared) directory; split directories are created under it.
    drop : columns written to the status files but not to the data files.
    """

    def __init__(self, root: str | Path, drop: tuple[str, ...] = ("status", "origin")) -> None:
        self.root = str(root)
        self.drop = drop

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[str]:
        written: list[str] = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            written += self._write_table(table)
        return written

    def _write_table(self, table: pa.Table) -> list[str]:
        name = f"{uuid.uuid4().hex}.parquet"
        written = []
        if "status" in table.column_names:
            status = table.select([c for c in STATUS_COLUMNS if c in table.column_names])
            written.append(_write(status, Path(self.root, STATUS_DIR, name)))
            table = table.filter(pc.equal(table["status"], "ok"))
        data = table.drop_columns([c for c in self.drop if c in table.column_names])
        splits = pc.unique(table["split"]).to_pylist() if table.num_rows else []
        for split in sorted(splits):
            part = data.filter(pc.equal(table["split"], split))
            written.append(_write(part, Path(self.root, split, name)))
        return written

    def on_write_complete(self, write_result: Any) -> None:
        reported = {path for paths in write_result.write_returns for path in paths}
        for path in Path(self.root).rglob("*.parquet"):
            if str(path) not in reported:  # from an attempt that failed and was retried
                path.unlink()


def _write(table: pa.Table, path: Path) -> str:
    """Write under a temporary name, then rename: a killed task leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return str(path)


def first_written(root: str | Path) -> float | None:
    """When the first rows reached disk (epoch seconds): the oldest status file's mtime, or None
    before any was written. Every row, ok or not, has a status file, so this is the time the
    first preprocessed sample came out of the pipeline."""
    times = [p.stat().st_mtime for p in Path(root, STATUS_DIR).glob("*.parquet")]
    return min(times) if times else None


def read_status(root: str | Path) -> pa.Table:
    """Every row's bookkeeping columns written by :class:`SplitParquetSink` under ``root``."""
    directory = Path(root, STATUS_DIR)
    files = sorted(directory.glob("*.parquet")) if directory.is_dir() else []
    if not files:
        return pa.table({"key": pa.array([], pa.string()), "split": pa.array([], pa.string()),
                         "status": pa.array([], pa.string()),
                         "source_shard": pa.array([], pa.string()),
                         "origin": pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def drop_keys(root: str | Path, splits: Iterable[str], keys: set[str]) -> int:
    """Remove the rows whose ``key`` is in ``keys`` from the data files of ``splits``.

    Only files holding such a key are rewritten (their key column is read first), so a rare
    repeated key costs one file, not the dataset. Returns the number of rows removed.
    """
    removed = 0
    wanted = pa.array(sorted(keys), pa.string())
    for split in splits:
        for path in sorted(Path(root, split).glob("*.parquet")):
            hit = pc.is_in(pq.read_table(path, columns=["key"])["key"], value_set=wanted)
            if not pc.any(hit).as_py():
                continue
            table = pq.read_table(path)
            keep = table.filter(pc.invert(pc.is_in(table["key"], value_set=wanted)))
            removed += table.num_rows - keep.num_rows
            if keep.num_rows:
                _write(keep, path)
            else:
                path.unlink()
    return removed


def rows_in(directory: str | Path) -> int:
    """Rows in a directory of parquet files, from their footers (no data is read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows
               for path in sorted(Path(directory).glob("*.parquet")))
