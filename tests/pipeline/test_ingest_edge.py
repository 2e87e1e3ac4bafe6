"""Ingest on what a new user's data looks like: dotted file names, case collisions, one .tar,
an output folder that holds something else, failures, and the origin of every sample."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.formats.shards import ORIGIN_FIELD, read_shard, shard_key, split_stem
from pipeline.ingest import IngestConfig, IngestError, ingest
from workflows.cli import main

CAPTION = "一只猫 🐱 café"
RATE = 44100


def _image(path: Path, value: int, fmt: str) -> bytes:
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def _audio(path: Path, fmt: str, seconds: float = 0.1) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1)
    soundfile.write(path, 0.5 * stereo, RATE, format=fmt)
    return path.read_bytes()


def _shards(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tar"))


def _read_both(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read by our checked reader and by webdataset, which must agree."""
    ours = {}
    for shard in _shards(out):
        with open(shard, "rb") as stream:
            for sample in read_shard(stream, shard.name):
                assert sample.error is None, sample.error
                assert sample.key not in ours, sample.key
                ours[sample.key] = sample.members
    theirs = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
              for s in wds.WebDataset([str(p) for p in _shards(out)], shardshuffle=False)}
    assert ours == theirs
    return ours


def _member_names(out: Path) -> list[str]:
    names = []
    for shard in _shards(out):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def _quarantine(out: Path) -> list[dict[str, str]]:
    table = pq.read_table(out / "quarantine.parquet")
    assert table.column_names == ["key", "shard", "stage", "reason", "origin"]
    return table.to_pylist()


def _accounted(manifest: dict, n_in: int, n_out: int) -> None:
    counts = manifest["counts"]
    assert (counts["in"], counts["out"], counts["quarantined"]) == (n_in, n_out, n_in - n_out)


def _origin(members: dict[str, bytes]) -> dict:
    return json.loads(members["json"])[ORIGIN_FIELD]


# ----------------------------------------------------------------------------- names

def test_stem_ends_at_the_last_dot_and_keys_map_dots_alike():
    assert split_stem("IMG_0001.final.JPG") == ("IMG_0001.final", "jpg")
    assert split_stem("d.x/a.b.c.png") == ("d.x/a.b.c", "png")
    assert split_stem("README") == (None, None) and split_stem("a.") == (None, None)
    assert shard_key("d.x/IMG_0001.final") == "d.x/IMG_0001_final"
    assert shard_key("plain") == "plain"
    assert ORIGIN_FIELD == "mmvq_origin"


def test_folder_dotted_names_keep_their_stem_and_collisions_are_quarantined(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    jpg = _image(src / "IMG_0001.final.jpg", 10, "JPEG")
    (src / "IMG_0001.final.txt").write_text(CAPTION, encoding="utf-8")
    _image(src / "x.jpg", 20, "JPEG")
    v2 = _image(src / "x.v2.png", 30, "PNG")
    _image(src / "a.b.jpg", 40, "JPEG")
    (src / "a.b.txt").write_text("first a_b")
    _image(src / "a_b.jpg", 50, "JPEG")  # maps to the key of a.b: the later one is quarantined
    flac = _audio(src / "sub" / "song.v1.flac", "FLAC")
    (src / "sub" / "song.v1.json").write_text(
        json.dumps({"split": "val", "caption": CAPTION, "n": 3}), encoding="utf-8")

    manifest = ingest(IngestConfig(source=str(src)), tmp_path / "out")
    out = tmp_path / "out"
    _accounted(manifest, 6, 5)
    samples = _read_both(out)
    assert {k: sorted(m) for k, m in samples.items()} == {
        "IMG_0001_final": ["jpg", "json", "txt"], "x": ["jpg", "json"], "x_v2": ["json", "png"],
        "a_b": ["jpg", "json", "txt"], "sub/song_v1": ["flac", "json"]}
    assert sorted(_member_names(out)) == sorted(
        f"{k}.{e}" for k, m in samples.items() for e in m)  # every name unique, no '.' in keys
    assert samples["IMG_0001_final"]["jpg"] == jpg and samples["x_v2"]["png"] == v2
    assert samples["IMG_0001_final"]["txt"].decode() == CAPTION
    assert samples["a_b"]["txt"] == b"first a_b"
    assert manifest["counts"]["modalities"] == {"audio": 1, "image": 4, "json": 5, "text": 2}

    wave, rate = soundfile.read(io.BytesIO(samples["sub/song_v1"]["flac"]))
    assert samples["sub/song_v1"]["flac"] == flac and rate == RATE and wave.shape[1] == 2
    meta = json.loads(samples["sub/song_v1"]["json"])
    assert meta == {"split": "val", "caption": CAPTION, "n": 3, ORIGIN_FIELD: {
        "source": "sub/song.v1", "files": {"flac": "sub/song.v1.flac", "json": "sub/song.v1.json"}}}
    assert CAPTION.encode() in samples["sub/song_v1"]["json"]  # UTF-8, not \\u escapes
    assert list(meta) == sorted(meta)
    assert _origin(samples["IMG_0001_final"]) == {
        "source": "IMG_0001.final",
        "files": {"jpg": "IMG_0001.final.jpg", "txt": "IMG_0001.final.txt"}}
    assert json.loads(samples["x"]["json"]) == {
        "split": "train", ORIGIN_FIELD: {"source": "x", "files": {"jpg": "x.jpg"}}}

    [row] = _quarantine(out)
    assert row["key"] == "a_b" and row["stage"] == "ingest"
    assert row["reason"] == (f"duplicate key 'a_b' (first taken from {src / 'a.b.jpg'}, "
                             f"{src / 'a.b.txt'})")
    assert row["origin"] == str(src / "a_b.jpg") and row["shard"] == str(src / "a_b")


def test_csv_keys_map_like_folder_stems_and_rows_are_their_origin(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    _image(media / "cat.jpg", 60, "JPEG")
    _audio(media / "cat.ogg", "OGG")
    (media / "cap.txt").write_text(CAPTION, encoding="utf-8")
    rows = [
        {"key": "IMG_0001.final", "image": "media/cat.jpg", "audio": "media/cat.ogg",
         "text": CAPTION, "license": "CC-BY"},
        {"key": "a_b", "image": "media/cat.jpg", "text_path": "media/cap.txt"},
        {"key": "a.b", "image": "media/cat.jpg", "text": "maps onto a_b"},
        {"key": "gone", "image": "media/missing.png"},
        {"key": "x/..", "image": "media/cat.jpg"},  # refused, not renamed to x/__
    ]
    with open(tmp_path / "index.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["key", "image", "audio", "text", "text_path",
                                         "license"])
        writer.writeheader()
        writer.writerows(rows)
    manifest = ingest(IngestConfig(source=str(tmp_path / "index.csv")), tmp_path / "out")
    _accounted(manifest, 5, 2)
    samples = _read_both(tmp_path / "out")
    assert {k: sorted(m) for k, m in samples.items()} == {
        "IMG_0001_final": ["jpg", "json", "ogg", "txt"], "a_b": ["jpg", "json", "txt"]}
    assert samples["IMG_0001_final"]["txt"].decode() == CAPTION
    wave, rate = soundfile.read(io.BytesIO(samples["IMG_0001_final"]["ogg"]))
    assert rate == RATE and wave.shape[1] == 2
    assert json.loads(samples["IMG_0001_final"]["json"]) == {
        "license": "CC-BY", "split": "train", ORIGIN_FIELD: {
            "source": "index.csv row 1", "files": {"jpg": "media/cat.jpg",
                                                   "ogg": "media/cat.ogg"}}}
    assert _origin(samples["a_b"]) == {
        "source": "index.csv row 2", "files": {"jpg": "media/cat.jpg", "txt": "media/cap.txt"}}

    rows_out = {r["key"]: r for r in _quarantine(tmp_path / "out")}
    assert sorted(rows_out) == ["a_b", "gone", "x/.."]
    csv_uri = str(tmp_path / "index.csv")
    assert rows_out["a_b"]["reason"] == f"duplicate key 'a_b' (first taken from {csv_uri} row 2)"
    assert rows_out["a_b"]["origin"] == f"{csv_uri} row 3"
    assert rows_out["gone"]["origin"] == str(media / "missing.png")
    assert "'..' component" in rows_out["x/.."]["reason"]
    assert rows_out["x/.."]["origin"] == rows_out["x/.."]["shard"] == f"{csv_uri} row 5"


def test_two_files_for_one_member_or_modality_are_quarantined_naming_both(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "y.jpg", 1, "JPEG")
    _image(src / "y.JPG", 2, "JPEG")  # would be a second member named y.jpg
    _image(src / "z.jpg", 3, "JPEG")
    _image(src / "z.png", 4, "PNG")  # which one is z's image?
    _audio(src / "w.flac", "FLAC")
    _audio(src / "w.ogg", "OGG")
    (src / "w.txt").write_text("ok")
    (src / "n.md").write_text("a")
    (src / "n.MD").write_text("b")
    (src / "ok.JPG").write_bytes((src / "y.JPG").read_bytes())
    (src / "ok.txt").write_text(CAPTION, encoding="utf-8")
    manifest = ingest(IngestConfig(source=str(src)), tmp_path / "out")
    _accounted(manifest, 5, 1)
    samples = _read_both(tmp_path / "out")
    assert {k: sorted(m) for k, m in samples.items()} == {"ok": ["jpg", "json", "txt"]}
    assert _origin(samples["ok"])["files"] == {"jpg": "ok.JPG", "txt": "ok.txt"}
    assert sorted(_member_names(tmp_path / "out")) == ["ok.jpg", "ok.json", "ok.txt"]
    rows = {r["key"]: (r["reason"], r["origin"]) for r in _quarantine(tmp_path / "out")}
    assert rows == {
        "y": ("two image files for key 'y': y.JPG, y.jpg", str(src / "y.jpg")),
        "z": ("two image files for key 'z': z.jpg, z.png", str(src / "z.png")),
        "w": ("two audio files for key 'w': w.flac, w.ogg", str(src / "w.ogg")),
        "n": ("two files with extension 'md' for key 'n': n.MD, n.md", str(src / "n.md"))}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_single_tar_is_a_shards_source(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    jpg, png = _image(media / "i.jpg", 5, "JPEG"), _image(media / "i.png", 6, "PNG")
    ogg = _audio(media / "a.ogg", "OGG")
    lone = tmp_path / "one" / "old.tar"
    lone.parent.mkdir()
    _tar(lone, [("k.jpg", jpg), ("k.ogg", ogg), ("k.txt", CAPTION.encode()),
                ("k.json", json.dumps({"split": "val", ORIGIN_FIELD: "stale"}).encode()),
                ("two.jpg", jpg), ("two.png", png)])
    outs = {}
    for name, fmt in (("auto", "auto"), ("shards", "shards")):
        manifest = ingest(IngestConfig(source=str(lone), format=fmt), tmp_path / name)
        _accounted(manifest, 2, 1)
        outs[name] = [(r["path"], r["sha256"]) for r in manifest["shards"]]
    # The folder holding it gives the same bytes: origins are relative to the source.
    assert ingest(IngestConfig(source=str(lone.parent)), tmp_path / "dir")["shards"][0][
        "sha256"] == outs["auto"][0][1]
    assert outs["auto"] == outs["shards"]
    samples = _read_both(tmp_path / "auto")
    assert {k: sorted(m) for k, m in samples.items()} == {"k": ["jpg", "json", "ogg", "txt"]}
    assert samples["k"]["txt"].decode() == CAPTION
    assert json.loads(samples["k"]["json"]) == {"split": "val", ORIGIN_FIELD: {
        "source": "old.tar", "files": {"jpg": "old.tar#k.jpg", "json": "old.tar#k.json",
                                       "ogg": "old.tar#k.ogg", "txt": "old.tar#k.txt"}}}
    [row] = _quarantine(tmp_path / "auto")
    assert (row["key"], row["reason"], row["origin"]) == (
        "two", "two image files for key 'two': two.jpg, two.png", f"{lone}#two.png")
    with pytest.raises(IngestError, match="is a file; format folder needs a folder"):
        ingest(IngestConfig(source=str(lone), format="folder"), tmp_path / "f")
    with pytest.raises(IngestError, match="is a folder; format csv needs a manifest file"):
        ingest(IngestConfig(source=str(lone.parent), format="csv"), tmp_path / "c")
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- the output folder

def _two_sources(tmp_path: Path) -> tuple[Path, Path]:
    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        _image(tmp_path / name / f"{name}.png", value, "PNG")
        (tmp_path / name / f"{name}.txt").write_text(CAPTION, encoding="utf-8")
    return tmp_path / "a", tmp_path / "b"


def test_another_source_or_foreign_folder_is_refused_unless_overwrite(tmp_path):
    a, b = _two_sources(tmp_path)
    out = tmp_path / "out"
    first = ingest(IngestConfig(source=str(a)), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(IngestError) as err:
        ingest(IngestConfig(source=str(b)), out)
    assert str(err.value) == (
        f"ingest output {out} holds shards ingested from {a}; ingesting {b} there would delete "
        "them: choose another --out, or pass --overwrite (ingest.overwrite) to replace it")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # The same source, also spelled as a file:// URI, reruns without --overwrite.
    again = ingest(IngestConfig(source=a.as_uri()), out)
    assert [r["sha256"] for r in again["shards"]] == [r["sha256"] for r in first["shards"]]
    replaced = ingest(IngestConfig(source=str(b), overwrite=True), out)
    assert replaced["source"] == str(b) and list(_read_both(out)) == ["b"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match=r"is not empty and holds no `mmvq ingest` output"):
        ingest(IngestConfig(source=str(a)), foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    ingest(IngestConfig(source=str(a), overwrite=True), foreign)
    assert (foreign / "notes.txt").read_text() == "mine" and list(_read_both(foreign)) == ["a"]
    (tmp_path / "empty").mkdir()
    assert ingest(IngestConfig(source=str(a)), tmp_path / "empty")["counts"]["out"] == 1


def test_an_interrupted_run_is_resumed_but_not_replaced_by_another_source(tmp_path):
    a, b = _two_sources(tmp_path)
    out = tmp_path / "out"

    def interrupt(record):
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        ingest(IngestConfig(source=str(a)), out, on_shard=interrupt)
    assert (out / ".ingest-journal.jsonl").exists() and not (out / "manifest.json").exists()
    with pytest.raises(IngestError, match=f"holds shards ingested from {a}; ingesting {b}"):
        ingest(IngestConfig(source=str(b)), out)
    assert ingest(IngestConfig(source=str(a)), out)["counts"]["out"] == 1


def test_cli_refuses_another_source_and_overwrite_replaces_it(tmp_path, capsys):
    a, b = _two_sources(tmp_path)
    out = tmp_path / "out"
    assert main(["ingest", str(a), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["ingest", str(b), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"mmvq ingest: ingest output {out} holds shards ingested "
                                   f"from {a}; ingesting {b} there")
    assert list(_read_both(out)) == ["a"]
    assert main(["ingest", str(b), "--out", str(out), "--overwrite"]) == 0
    assert "in 1 = out 1 + quarantined 0" in capsys.readouterr().out
    assert list(_read_both(out)) == ["b"]


# ----------------------------------------------------------------------------- failures

def test_a_failed_ingest_leaves_nothing_behind(tmp_path):
    a, _ = _two_sources(tmp_path)
    (a / "bad.json").write_text("{not json")
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(IngestError, match=r"key 'bad': json: does not parse"):
        ingest(IngestConfig(source=str(a), strict=True), out)
    assert not (tmp_path / "new").exists()
    with pytest.raises(IngestError, match="does not exist"):
        ingest(IngestConfig(source=str(tmp_path / "nowhere")), out)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder the call did not create stays
    with pytest.raises(IngestError):
        ingest(IngestConfig(source=str(tmp_path / "nowhere")), tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_cli_failure_exits_non_zero_on_stderr_with_nothing_left(tmp_path, capsys):
    a, _ = _two_sources(tmp_path)
    (a / "bad.json").write_text("[1, 2]")
    out = tmp_path / "new" / "out"
    assert main(["ingest", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"mmvq ingest: ingest source {tmp_path / 'nowhere'} does not exist\n"
    assert captured.out == "" and not (tmp_path / "new").exists()
    assert main(["ingest", str(a), "--out", str(out), "--strict"]) == 1
    assert "key 'bad': json: does not parse (a list, not an object)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["ingest", str(a), "--out", str(out), "--max-samples", "0"]) == 1
    assert "max_samples_per_shard must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_origin_json_is_deterministic(tmp_path):
    a, _ = _two_sources(tmp_path)
    (a / "a.json").write_text(json.dumps({"z": 1, "caption": CAPTION, "split": "val"}))
    one = ingest(IngestConfig(source=str(a)), tmp_path / "one")
    two = ingest(IngestConfig(source=a.as_uri()), tmp_path / "two")
    assert [r["sha256"] for r in one["shards"]] == [r["sha256"] for r in two["shards"]]
    [members] = _read_both(tmp_path / "one").values()
    assert members["json"] == json.dumps(
        {"caption": CAPTION, "split": "val", "z": 1, ORIGIN_FIELD: {
            "files": {"json": "a.json", "png": "a.png", "txt": "a.txt"}, "source": "a"}},
        sort_keys=True, ensure_ascii=False).encode()
