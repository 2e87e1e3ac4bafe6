"""Ingest: folder / CSV / JSONL / shards -> validated shards; resumable, byte-identical."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.formats.shards import read_shard
from pipeline.ingest import IngestConfig, IngestError, ingest
from pipeline.storage import resolve
from workflows.cli import main


def _png(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, n: int = 7) -> Path:
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    for i in range(n):
        base = root / ("sub" if i % 3 == 0 else ".") / f"s{i:02d}"
        base.with_suffix(".png").write_bytes(_png(i * 10, 16 + i))
        base.with_suffix(".txt").write_text(f"caption {i}")
        if i % 2:
            base.with_suffix(".json").write_text(json.dumps({"split": "val", "source": "t"}))
    (root / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    return root


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _read_ours(out: Path) -> list[tuple[str, list[str]]]:
    samples = []
    for shard in sorted(out.rglob("*.tar")):
        with open(shard, "rb") as stream:
            for s in read_shard(stream, shard.name):
                assert s.error is None, s.error
                samples.append((s.key, sorted(s.members)))
    return samples


def _read_webdataset(out: Path) -> list[tuple[str, list[str]]]:
    urls = [str(p) for p in sorted(out.rglob("*.tar"))]
    return [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in wds.WebDataset(urls, shardshuffle=False)]


def test_folder_ingest_shards_manifest_and_both_readers_agree(tmp_path):
    source = _folder(tmp_path / "in")
    manifest = ingest(IngestConfig(source=str(source), max_samples_per_shard=2), tmp_path / "out")
    out = tmp_path / "out"
    assert manifest["counts"]["splits"] == {"train": 4, "val": 3}
    assert manifest["counts"]["modalities"] == {"image": 7, "json": 7, "text": 7}
    assert manifest["counts"]["in"] == 7 and manifest["counts"]["quarantined"] == 0
    assert [r["path"] for r in manifest["shards"]] == [
        "train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar",
        "val/shard-000001.tar"]
    for record in manifest["shards"]:
        assert resolve(str(out / record["path"])).sha256() == record["sha256"]
        assert (out / record["path"]).stat().st_size == record["bytes"]
    ours, theirs = _read_ours(out), _read_webdataset(out)
    assert ours == theirs and len(ours) == 7
    assert ("sub/s00", ["json", "png", "txt"]) in ours  # the key keeps its folder
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_csv_and_jsonl_manifests_with_bad_rows_quarantined(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for i in range(4):
        (media / f"{i}.png").write_bytes(_png(i * 40))
    (media / "cap.txt").write_text("from a file")
    rows = [
        {"key": "a", "image": "media/0.png", "text": "inline caption", "split": "val",
         "license": "CC0"},
        {"key": "b", "image": "media/1.png", "text_path": "media/cap.txt"},
        {"key": "a", "image": "media/2.png", "text": "same key again"},
        {"key": "c", "image": "media/missing.png", "text": "x"},
        {"key": "d.e", "image": "media/3.png", "text": "dot in key"},
        {"key": "../f", "image": "media/3.png", "text": "escape"},
        {"key": "g", "image": "media/cap.txt"},
    ]
    with open(tmp_path / "index.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["key", "image", "text", "text_path", "split",
                                         "license"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    for name, extra in (("index.csv", 0), ("index.jsonl", 1)):
        out = tmp_path / f"out-{name}"
        manifest = ingest(IngestConfig(source=str(tmp_path / name)), out)
        assert manifest["counts"] == {"in": 7 + extra, "out": 3, "quarantined": 4 + extra,
                                      "splits": {"train": 2, "val": 1},
                                      "modalities": {"image": 3, "json": 3, "text": 3}}
        reasons = {r["key"]: r["reason"] for r in
                   pq.read_table(out / "quarantine.parquet").to_pylist()}
        assert reasons["a"].startswith("duplicate key 'a' (first taken from")
        assert "media/missing.png not found" in reasons["c"]
        assert "d.e" not in reasons and "'..' component" in reasons["../f"]
        assert "extension 'txt', not one of" in reasons["g"]
        samples = {s["__key__"]: s for s in wds.WebDataset(
            [str(p) for p in sorted(out.rglob("*.tar"))], shardshuffle=False)}
        assert samples["a"]["txt"] == b"inline caption"
        assert samples["d_e"]["txt"] == b"dot in key"  # '.' in a key maps to '_'
        meta = json.loads(samples["a"]["json"])
        assert meta.pop("mmvq_origin") == {"source": f"{name} row 1",
                                           "files": {"png": "media/0.png"}}
        assert meta == {"license": "CC0", "split": "val"}
        assert samples["b"]["txt"] == b"from a file" and samples["b"]["png"] == _png(40)
    with pytest.raises(IngestError, match=r"index.csv row 3, key 'a': duplicate key"):
        ingest(IngestConfig(source=str(tmp_path / "index.csv"), strict=True), tmp_path / "s")


def test_byte_limit_and_resume_after_interruption_is_byte_identical(tmp_path):
    source = _folder(tmp_path / "in", n=12)
    config = IngestConfig(source=str(source), max_samples_per_shard=100,
                          max_bytes_per_shard=3 * 1024)
    reference = ingest(config, tmp_path / "ref")
    assert len(reference["shards"]) >= 4
    for record in reference["shards"]:
        assert record["bytes"] <= 3 * 1024 or record["samples"] == 1

    written = []

    def crash_after_two(record):
        written.append(record["path"])
        if len(written) == 2:
            raise KeyboardInterrupt("killed")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ingest(config, out, on_shard=crash_after_two)
    assert not (out / "manifest.json").exists() and (out / ".ingest-journal.jsonl").exists()
    (out / "val").mkdir(exist_ok=True)
    (out / "val" / ".shard-000009.tar.dead.tmp").write_bytes(b"half")  # a killed write
    first = (out / written[0]).stat().st_mtime_ns
    rewritten = []
    ingest(config, out, on_shard=lambda r: rewritten.append(r["path"]))
    assert (out / written[0]).stat().st_mtime_ns == first  # kept, not rewritten
    assert _tree(out) == _tree(tmp_path / "ref")

    # A corrupted shard fails its sha256 check and is written again.
    victim = out / reference["shards"][-1]["path"]
    victim.write_bytes(victim.read_bytes()[:-10] + b"x" * 10)
    ingest(config, out)
    assert _tree(out) == _tree(tmp_path / "ref")


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_source_merges_out_of_order_members_and_quarantines_damage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _raw_tar(src / "a.tar", [("x.png", _png(1)), ("y.png", _png(2)), ("y.txt", b"why"),
                             ("x.txt", b"ex"), ("../z.png", _png(3)), ("w.txt", b"1"),
                             ("w.txt", b"2")])
    _raw_tar(src / "b.tar", [("x.png", _png(4)), ("v.png", _png(5)), ("v.txt", b"vee")])
    data = (src / "b.tar").read_bytes()
    (src / "b.tar").write_bytes(data[:data.index(b"v.txt") + 512 + 1])  # v.txt cut off
    manifest = ingest(IngestConfig(source=str(src)), tmp_path / "out")
    reasons = {(r["key"], r["reason"].split(" ")[0]) for r in
               pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()}
    assert reasons == {("../z", "unsafe"), ("w", "duplicate"), ("x", "duplicate"),
                       ("v", "member")}
    assert manifest["counts"]["out"] == 2
    assert _read_ours(tmp_path / "out") == [("x", ["json", "png", "txt"]),
                                            ("y", ["json", "png", "txt"])]


def test_file_uri_gives_the_same_bytes_and_cli_prints_accounting(tmp_path, capsys):
    source = _folder(tmp_path / "in")
    ingest(IngestConfig(source=str(source), max_samples_per_shard=3), tmp_path / "a")
    assert main(["ingest", source.as_uri(), "--out", (tmp_path / "b").as_uri(),
                 "--max-samples", "3", "--max-bytes", "1GiB"]) == 0
    assert "in 7 = out 7 + quarantined 0" in capsys.readouterr().out
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.pop("manifest.json") != b.pop("manifest.json")  # the source is written as given
    assert a == b  # same shards, same quarantine table
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    assert "manifest columns" in capsys.readouterr().out
