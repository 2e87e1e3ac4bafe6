"""Preprocess stage: webdataset shards -> model-ready columns, every sample accounted for.

The pure per-sample function (:func:`pipeline.formats.samples.preprocess_sample`) turns one raw
sample into the preprocessed columns of DESIGN.md, or raises ``BadSample`` with a reason.
:class:`Preprocessor` is the thin Ray Data actor around it: it builds its resamplers once and
maps whole batches; :class:`ShardPreprocessor`, the one the stage runs, also reads the shards
themselves (one shard path per input row) with the checked tar reader of
:mod:`pipeline.formats.shards`, not ``ray.data.read_webdataset``: that reader groups
*consecutive* members only, so out-of-order members silently become two samples with one key, a
truncated tar ends the shard early without a word, and a duplicate member kills the read task.
Ours marks all of those, and a key seen twice anywhere in the input is quarantined in every
occurrence. Shards may sit on local disk or an object store (:mod:`pipeline.storage`). The stage
writes one parquet dataset per split, the quarantine table and the data contract
(:mod:`pipeline.formats.preprocessed`: the shapes and vocabulary train must take), and checks
``in = out + quarantined``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from mmvq.config_io import ConfigError
from mmvq.text_vocab import (
    BYTES,
    TOKENIZER_JSON,
    VOCAB_FILE,
    VOCAB_SIZE,
    TextVocab,
    pretoken_counts,
    train_bpe_from_counts,
)
from pipeline.formats.preprocessed import TRAIN_SPLIT, write_contract
from pipeline.formats.samples import (
    MAX_TEXT_BYTES,
    BadSample,
    Resamplers,
    SampleSpec,
    decode_text,
    member,
    preprocess_sample,
    sample_split,
    stack_rows,
)
from pipeline.formats.shards import (
    EXTENSIONS,
    ORIGIN_FIELD,
    QUARANTINE_FILE,
    SHARD_MANIFEST,
    RawSample,
    read_samples,
)
from pipeline.stage import StageContext, process_started
from pipeline.storage import resolve


@dataclass(frozen=True)
class PreprocessConfig(SampleSpec):
    """The sample spec (shapes, caps) plus how the stage runs; the same YAML keys as ever."""

    # Text ids: "bytes" (UTF-8, no file) or "bpe", a byte-level BPE trained on the train split's
    # captions first and written as text_vocab.json in the output (fit_text_vocab).
    text_vocab: Literal["bytes", "bpe"] = "bytes"
    bpe_vocab_size: int = 1024  # bpe only: target ids incl. 256 bytes + PAD; may end up fewer
    batch_size: int = 128  # rows per map_batches call: fewer, larger Ray tasks (bench-data)
    num_actors: int = 2  # preprocessing actors at most (the pool starts with one and grows)
    strict: bool = False  # fail on the first bad sample instead of quarantining it
    # Shards compressed with gzip, bzip2 or xz are quarantined (one row naming the shard)
    # unless this is set: 300 KiB of gzip can expand to 300 MiB of members, and webdataset
    # shards are plain tars. Set it only for shards from a source you trust.
    allow_compressed_shards: bool = False

    def min_resources(self) -> dict[str, float]:
        """What Ray must have for the first preprocessing actor (it reads its own shards)."""
        return {"CPU": 1.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bpe_vocab_size <= VOCAB_SIZE:
            raise ConfigError(f"preprocess.bpe_vocab_size must exceed the {VOCAB_SIZE} byte "
                              f"ids, got {self.bpe_vocab_size}")


_MODALITY_EXTENSIONS = {**EXTENSIONS, "json": ("json",)}


def sample_origin(sample: dict[str, Any], status: str) -> str:
    """The user's original file behind a sample (for quarantine tables), best effort.

    Shards written by ``mmvq ingest`` carry ``mmvq_origin`` in their json: the source (folder
    stem, manifest row, shard) and the original file of each member. A reason that starts with
    a modality ("image: cannot decode") names that member's file; otherwise the source. Shards
    from other tools have no such record: the shard and key are what is known.
    """
    fallback = f"{sample.get('__url__', '')}#{sample.get('__key__', '')}"
    raw = sample.get("json")
    if not isinstance(raw, bytes | bytearray | memoryview):
        return fallback
    try:
        record = json.loads(bytes(raw)).get(ORIGIN_FIELD) or {}
        files = record.get("files") or {}
        modality = status.split(":", 1)[0] if ":" in status else ""
        for ext in _MODALITY_EXTENSIONS.get(modality, ()):
            if files.get(ext):
                return str(files[ext])
        return str(record.get("source") or fallback)
    except (ValueError, AttributeError, TypeError):
        return fallback


def origin_root(shards: str | Path) -> str | None:
    """The folder that ``mmvq ingest``'s relative origins are relative to, for shards it wrote.

    Its manifest names the source: a folder (origins are below it), or a manifest/shard file
    (origins are beside it). None for shards no ingest wrote.
    """
    manifest = resolve(str(shards)).join(SHARD_MANIFEST)
    try:
        record = json.loads(manifest.read_bytes())
        source = str(record.get("source_path") or record.get("source") or "")
    except (OSError, ValueError, AttributeError):
        return None
    if not source:
        return None
    place = resolve(source)
    return (place.parent() if place.is_file() else place).uri


def absolute_origin(origin: str, root: str | None) -> str:
    """``origin`` joined to ``root`` unless it already is absolute (or there is no root)."""
    if root is None or "://" in origin or origin.startswith("/"):
        return origin
    return f"{root.rstrip('/')}/{origin}"


class Preprocessor:
    """Ray Data actor: maps a batch of raw webdataset rows to preprocessed rows.

    Every input row comes out: valid ones with ``status == "ok"``, bad ones with the reason in
    ``status`` and zero-filled tensors (they are split off into the quarantine table). Only
    :class:`BadSample` is the data's fault; any other exception is a bug and stops the stage,
    with the shard and key added to its notes.
    """

    def __init__(self, config: PreprocessConfig, vocab: TextVocab = BYTES) -> None:
        self.config = config
        self.resample = Resamplers(config.sample_rate)
        self.vocab = vocab

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of raw rows (member bytes by column, as a shard datasource gives them)."""
        return self.preprocess([{name: column[i] for name, column in batch.items()}
                                for i in range(len(batch["__key__"]))])

    def preprocess(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Raw samples (``__key__``, ``__url__``, ``__error__`` and member bytes by extension)
        -> one batch of preprocessed rows, in order."""
        rows = []
        for sample in samples:
            key = sample.get("__key__", "")
            shard = str(sample.get("__url__", ""))
            try:
                row = preprocess_sample(sample, self.config, self.resample, self.vocab)
                row["status"] = "ok"
            except BadSample as err:
                if self.config.strict:
                    raise BadSample(f"shard {shard}, key {key}: {err}") from err
                row = self._placeholder()
                row["status"] = str(err)
            except Exception as err:
                err.add_note(f"while preprocessing shard {shard}, key {key}")
                raise
            row["key"] = str(key)
            row["source_shard"] = shard
            row["origin"] = sample_origin(sample, row["status"])
            rows.append(row)
        return stack_rows(rows)

    def _placeholder(self) -> dict[str, Any]:
        c = self.config
        return {"image": np.zeros((c.image_size, c.image_size, 3), np.uint8),
                "audio": np.zeros(c.audio_samples, np.float32), "audio_len": 0,
                "text_ids": np.zeros(c.text_max_len, np.int32), "text_len": 0,
                "has_image": False, "has_audio": False, "has_text": False,
                "text": "", "split": c.default_split}


class ShardPreprocessor(Preprocessor):
    """Ray Data actor: reads whole shards, one path per input row, and preprocesses them.

    Each shard is streamed through :func:`pipeline.formats.shards.read_samples` (every check of
    the tar reader, a shard never split) and comes out ``config.batch_size`` rows at a time, so
    an actor holds one batch of raw members, never a shard. Reading in the actor, not in read
    tasks ahead of it, because on a small machine the hand-over cost more than the work: raw
    members went through the object store as Arrow blocks, a read task's process and the
    driver's scheduling of every block took ~5 CPU-ms a sample next to ~3 ms of decoding, and
    the pool ran one actor at a time behind a reader (make bench-data at 256 px: 164-193
    samples/s end to end before, ~340 after).
    """

    def __init__(self, config: PreprocessConfig, vocab: TextVocab = BYTES,
                 filesystem: Any = None) -> None:
        super().__init__(config, vocab)
        self.filesystem = filesystem if filesystem is not None else pa.fs.LocalFileSystem()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:  # type: ignore[override]
        for path in batch["path"]:
            samples: list[dict[str, Any]] = []
            for raw in self._read(str(path)):
                samples.append({"__key__": raw.key, "__url__": raw.shard, "__error__": raw.error,
                                **raw.members})
                if len(samples) == self.config.batch_size:
                    yield self.preprocess(samples)
                    samples = []
            if samples:
                yield self.preprocess(samples)

    def _read(self, path: str) -> Iterator[RawSample]:
        """The shard's samples; one that cannot be opened is one refused sample naming it."""
        try:
            stream = self.filesystem.open_input_stream(path)
        except OSError as err:
            yield RawSample("", path, error=f"shard is not a readable tar: {err}")
            return
        with stream:
            yield from read_samples(stream, path, self.config.allow_compressed_shards)


# ----------------------------------------------------------------------------- text vocabulary

# Preprocess turns captions into ids, so it decides the vocabulary. With ``text_vocab: bytes``
# the ids are UTF-8 bytes and nothing is written. With ``bpe`` a byte-level BPE
# (mmvq.text_vocab) is trained on the captions of the *train* split before any caption is
# encoded, and saved as text_vocab.json beside the split directories. Pre-token counts are
# computed by Ray Data per block and summed on the driver, which then runs the
# (deterministic) merge loop: the driver holds the distinct pre-tokens, never the corpus.

def train_split_captions(batch: dict[str, np.ndarray], default_split: str,
                         max_text_bytes: int | None = None) -> list[str]:
    """The captions of the train-split samples in a batch of raw webdataset rows.

    A sample's split is its ``json`` metadata's ``split`` (else ``default_split``), as in
    preprocess. Samples whose text or metadata does not decode are left out here; preprocess
    quarantines them, as it does a caption over ``max_text_bytes`` (None: preprocess's default).
    """
    max_bytes = MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes

    captions = []
    for i in range(len(batch["__key__"])):
        sample = {name: column[i] for name, column in batch.items()}
        text = member(sample, ("txt",))
        try:
            if text is not None and sample_split(sample, default_split) == TRAIN_SPLIT:
                captions.append(decode_text(text, max_bytes))
        except BadSample:
            continue
    return captions


def _count_batch(batch: dict[str, np.ndarray], default_split: str,
                 max_text_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Pre-token counts of a batch's train captions, one row per distinct pre-token; the
    caption count rides on the first row (``texts``, zero elsewhere) so that it sums up."""
    captions = train_split_captions(batch, default_split, max_text_bytes)
    counts = pretoken_counts(captions)
    chunks = sorted(counts)
    texts = np.zeros(len(chunks), dtype=np.int64)
    texts[:1] = len(captions)
    return {"chunk": np.array(chunks, dtype=object),
            "count": np.array([counts[c] for c in chunks], dtype=np.int64), "texts": texts}


def fit_text_vocab(paths: list[str], kind: str, vocab_size: int, default_split: str,
                   output_dir: Path, *, filesystem: Any = None, max_text_bytes: int | None = None,
                   allow_compressed: bool = False) -> TextVocab:
    """The vocabulary preprocess encodes captions with; a BPE is trained and saved.

    Parameters
    ----------
    paths : list of str
        The webdataset shards preprocess reads.
    kind : str
        ``bytes`` (returns the byte vocabulary, writes nothing) or ``bpe``.
    vocab_size : int
        Target BPE size (ids, PAD included); a small corpus may give fewer.
    default_split : str
        Split of samples whose metadata names none.
    output_dir : Path
        Where ``text_vocab.json`` is written (the stage's output directory).
    filesystem, max_text_bytes, allow_compressed
        As preprocess reads the shards: the same reader and caps, so a caption preprocess
        would quarantine (or a compressed shard it refuses) never trains the vocabulary.
    """
    if kind == "bytes":
        return BYTES
    import ray.data

    from pipeline.shard_source import ShardDatasource

    source = ShardDatasource(paths, filesystem=filesystem, allow_compressed=allow_compressed)
    raw = ray.data.read_datasource(source, num_cpus=0, concurrency=1).select_columns(
        ["__key__", "txt", "json"])
    counts: Counter[str] = Counter()
    num_texts = 0
    counting = raw.map_batches(_count_batch, batch_format="numpy", num_cpus=0, fn_kwargs={
        "default_split": default_split, "max_text_bytes": max_text_bytes})
    for batch in counting.iter_batches(batch_format="numpy"):
        # A batch joins several blocks' rows, so one pre-token can appear on several rows.
        for chunk, count in zip(batch["chunk"].tolist(), batch["count"].tolist(), strict=True):
            counts[chunk] += count
        num_texts += int(batch["texts"].sum())
    if not counts:
        raise ValueError(f"preprocess.text_vocab is 'bpe' but the {TRAIN_SPLIT!r} split of "
                         f"{len(paths)} shards has no captions to train it on")
    vocab = train_bpe_from_counts(counts, vocab_size, num_texts=num_texts)
    vocab.save(Path(output_dir) / VOCAB_FILE)
    # The same vocabulary for a language model's data loader (Hugging Face tokenizers).
    try:
        vocab.save_tokenizer_json(Path(output_dir) / TOKENIZER_JSON)
    except ValueError as err:  # two merges spelling the same bytes: rare, and only a convenience
        print(f"preprocess: no {TOKENIZER_JSON} beside {VOCAB_FILE}: {err}", file=sys.stderr)
    return vocab


# ----------------------------------------------------------------------------- reading shards

def shard_paths(location: str | Path) -> tuple[list[str], Any]:
    """All ``.tar`` shards under a directory path or URI (or that one ``.tar`` file), sorted:
    (paths, pyarrow filesystem)."""
    source = resolve(str(location))
    if source.is_file() and source.path.endswith(".tar"):
        return [source.path], source.fs
    paths = [info.path for info in source.files((".tar",))] if source.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no .tar shards under {location}")
    return paths, source.fs


def repeated_keys(keys: Any) -> dict[str, int]:
    """Keys that occur more than once (out-of-order members, or one key in two shards)."""
    counts = keys[keys != ""].value_counts()
    return {str(k): int(n) for k, n in counts[counts > 1].items()}


def repeated_reason(key: str, times: int, status: str) -> str:
    """Quarantine reason of one occurrence of a repeated key (its own problem, if any, kept)."""
    reason = (f"key {key!r} occurs {times} times in the input (out-of-order members or a "
              "duplicate key)")
    return reason if status == "ok" else f"{reason}; this occurrence: {status}"


# ----------------------------------------------------------------------------- the stage


def first_rows_timing(first: float | None, stage_started: float,
                      command_started: float | None) -> dict[str, float]:
    """Seconds from the stage's and the command's start to the first rows on disk (the
    ``time/first_rows_after_*_s`` metrics; empty when nothing was written)."""
    if first is None:
        return {}
    timing = {"time/first_rows_after_stage_s": round(first - stage_started, 2)}
    if command_started is not None:
        timing["time/first_rows_after_command_s"] = round(first - command_started, 2)
    return timing


def preprocessed_dataset(paths: list[str], filesystem: Any, config: PreprocessConfig,
                         vocab: TextVocab = BYTES) -> Any:
    """The stage's lazy Ray Data pipeline: shard paths -> :class:`ShardPreprocessor` actor pool.

    Every input sample comes out as one row with its ``status`` ("ok" or the reason); the stage
    streams it into per-split parquet, ``pipeline.bench.dataplane`` times it as is. One input
    block per shard, so the pool's actors take shards as they free up.
    """
    import ray

    from pipeline.raydata import actor_pool, bounded

    shards = ray.data.from_items([{"path": path} for path in paths],
                                 override_num_blocks=max(1, len(paths)))
    return bounded(shards.map_batches(
        ShardPreprocessor, fn_constructor_args=(config, vocab, filesystem), batch_size=1,
        batch_format="numpy", **actor_pool(config.num_actors)), config.num_actors)


def run(config: PreprocessConfig, ctx: StageContext) -> dict[str, Any]:
    """Read the ``synth`` or ``ingest`` shards (or any webdataset shards), preprocess them and
    stream the rows into parquet per split; quarantine what is bad; check the counts.

    Nothing decoded is held: rows go to disk as the actors produce them
    (:class:`pipeline.sinks.SplitParquetSink`), and the accounting afterwards reads only keys
    and reasons. A key read more than once (its members were scattered, or two samples share
    it) is found from those keys and removed from the files it reached: some readers would pair
    the wrong files, so every occurrence is quarantined.
    """
    from pipeline.raydata import io_tasks, write
    from pipeline.sinks import SplitParquetSink, drop_keys, first_written, read_status, rows_in

    began = time.time()
    paths, filesystem = shard_paths(ctx.inputs["shards"])
    # Text vocabulary first (a BPE trains on the train captions, text_vocab.json in the output).
    vocab = fit_text_vocab(paths, config.text_vocab, config.bpe_vocab_size,
                           config.default_split, ctx.output_dir, filesystem=filesystem,
                           max_text_bytes=config.max_text_bytes,
                           allow_compressed=config.allow_compressed_shards)
    write(preprocessed_dataset(paths, filesystem, config, vocab),
          SplitParquetSink(ctx.output_dir), concurrency=io_tasks(config.num_actors))
    timing = first_rows_timing(first_written(ctx.output_dir), began, process_started())
    statuses = read_status(ctx.output_dir).to_pandas()
    repeated = repeated_keys(statuses["key"])
    again = statuses["key"].isin(list(repeated))
    statuses.loc[again, "status"] = [
        repeated_reason(k, repeated[k], status)
        for k, status in zip(statuses.loc[again, "key"], statuses.loc[again, "status"],
                             strict=True)]
    ok = statuses["status"] == "ok"
    if config.strict and not ok.all():
        first = statuses.loc[~ok].iloc[0]
        raise BadSample(f"shard {first['source_shard']}, key {first['key']}: {first['status']}")
    splits = sorted(p.name for p in ctx.output_dir.iterdir()
                    if p.is_dir() and not p.name.startswith("."))
    if repeated:
        drop_keys(ctx.output_dir, splits, set(repeated))
        for split in [s for s in splits if not any((ctx.output_dir / s).glob("*.parquet"))]:
            (ctx.output_dir / split).rmdir()  # every row of it was a repeated key
            splits.remove(split)
    quarantine = statuses.loc[~ok, ["key", "source_shard", "status", "origin"]].rename(
        columns={"source_shard": "shard", "status": "reason"}).assign(stage="preprocess")
    root = origin_root(ctx.inputs["shards"])
    quarantine["origin"] = [absolute_origin(o, root) for o in quarantine["origin"]]
    pq.write_table(pa.Table.from_pandas(quarantine, preserve_index=False),
                   ctx.output_dir / QUARANTINE_FILE)
    shutil.rmtree(ctx.output_dir / ".status")

    counts: dict[str, Any] = {"in": len(statuses), "quarantined": int((~ok).sum())}
    for split in splits:
        counts[f"out/{split}"] = int((ok & (statuses["split"] == split)).sum())
        written = rows_in(ctx.output_dir / split)
        if written != counts[f"out/{split}"]:  # what is on disk is what the counts say
            raise RuntimeError(f"preprocess wrote {written} rows to {split}/ but counted "
                               f"{counts[f'out/{split}']}")
    counts["out"] = int(ok.sum())
    if counts["in"] != counts["out"] + counts["quarantined"]:
        raise RuntimeError(f"preprocess lost samples: {counts}")
    print(f"preprocess: in {counts['in']} = out {counts['out']} + quarantined "
          f"{counts['quarantined']}")
    if timing:
        print("preprocess: first rows on disk " + ", ".join(
            f"{v:.1f} s after the {what} started" for what, v in
            (("stage", timing.get("time/first_rows_after_stage_s")),
             ("command", timing.get("time/first_rows_after_command_s"))) if v is not None))
    if ctx.logger:
        ctx.logger.metrics({f"samples/{k}": v for k, v in counts.items()}, step=0)
        ctx.logger.metrics(timing, step=0)
        if len(quarantine):
            ctx.logger.artifact(ctx.output_dir / QUARANTINE_FILE)
    contract = write_contract(ctx.output_dir, config, vocab)
    return {"counts": counts, "splits": splits, "text_vocab": contract["text_vocab"]}

