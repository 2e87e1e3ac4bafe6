"""Ingest takes only what lies inside its source: no link is followed out of a folder, a
manifest's paths stay inside the manifest's folder, and no member over the size cap is read.
Every refusal is a quarantine row naming the path and why (in = out + quarantined)."""

import csv
import inspect
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.formats.shards import read_shard
from pipeline.ingest import IngestConfig, ingest
from pipeline.storage import Location
from workflows.cli import main

SECRET = b"SECRET-do-not-ship"


def _members(out: Path) -> dict[str, bytes]:
    """Every member of every output shard, by name."""
    found = {}
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                found[info.name] = tar.extractfile(info).read()
    return found


def _quarantine(out: Path) -> dict[str, dict[str, str]]:
    return {row["key"]: row for row in pq.read_table(out / "quarantine.parquet").to_pylist()}


def _outside(tmp_path: Path) -> Path:
    """Secrets beside the source, where a link or a manifest row could point."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "dir" / "b.txt").write_bytes(SECRET)
    return outside


def test_folder_ingest_follows_no_link(tmp_path):
    outside = _outside(tmp_path)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("kept")
    (src / "sub" / "c.txt").write_text("kept too")
    (src / "leak.txt").symlink_to(outside / "secret.txt")       # a file link leaving src
    (src / "linked").symlink_to(outside / "dir")                # a folder link leaving src
    (src / "alias.txt").symlink_to(src / "a.txt")               # a link that stays inside
    (src / "pair.txt").write_text("caption")                    # a sample with a linked member
    (src / "pair.json").symlink_to(outside / "secret.txt")

    manifest = ingest(IngestConfig(source=str(src)), tmp_path / "out")

    members = _members(tmp_path / "out")
    assert not [name for name, data in members.items() if SECRET in data]
    assert {n.rsplit(".", 1)[0] for n in members} == {"a", "sub/c"}
    rows = _quarantine(tmp_path / "out")
    assert set(rows) == {"leak", "linked", "alias", "pair"}
    assert rows["leak"]["reason"].startswith(
        f"'leak.txt' is a symbolic link to '{outside / 'secret.txt'}': ingest never follows")
    assert rows["linked"]["origin"] == str(src / "linked")
    assert str(outside / "dir") in rows["linked"]["reason"]
    assert rows["pair"]["origin"] == str(src / "pair.json")  # names the link, not the caption
    assert "'alias.txt' is a symbolic link" in rows["alias"]["reason"]
    counts = manifest["counts"]
    assert (counts["in"], counts["out"], counts["quarantined"]) == (6, 2, 4)


def test_shard_folder_link_to_an_outside_shard_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.tar"
    with tarfile.open(outside, "w") as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = len(SECRET)
        tar.addfile(info, io.BytesIO(SECRET))
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "own.tar", "w") as tar:
        info = tarfile.TarInfo("y.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    (shards / "more.tar").symlink_to(outside)

    manifest = ingest(IngestConfig(source=str(shards)), tmp_path / "out")

    assert not [n for n, data in _members(tmp_path / "out").items() if SECRET in data]
    rows = _quarantine(tmp_path / "out")
    assert list(rows) == ["more.tar"] and "symbolic link" in rows["more.tar"]["reason"]
    assert (manifest["counts"]["in"], manifest["counts"]["out"]) == (2, 1)


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, ["key", "text_path", "image"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["index.csv", "index.jsonl"])
def test_manifest_paths_must_resolve_inside_its_folder(tmp_path, name):
    outside = _outside(tmp_path)
    src = tmp_path / "src"
    (src / "media").mkdir(parents=True)
    (src / "media" / "cap.txt").write_text("inside")
    (src / "media" / "alias.txt").symlink_to(src / "media" / "cap.txt")
    (src / "media" / "escape.txt").symlink_to(outside / "secret.txt")
    rows = [{"key": "rel", "text_path": "media/cap.txt"},
            {"key": "abs_inside", "text_path": str(src / "media" / "cap.txt")},
            {"key": "inner_link", "text_path": "media/alias.txt"},
            {"key": "abs", "text_path": str(outside / "secret.txt")},
            {"key": "dotdot", "text_path": "../outside/dir/b.txt"},
            {"key": "link_out", "text_path": "media/escape.txt"},
            {"key": "uri", "text_path": (outside / "secret.txt").as_uri()}]
    index = _manifest(src / name, rows)

    manifest = ingest(IngestConfig(source=str(index)), tmp_path / "out")

    members = _members(tmp_path / "out")
    assert sorted(members) == sorted(f"{k}.{e}" for k in ("rel", "abs_inside", "inner_link")
                                     for e in ("json", "txt"))
    assert not [n for n, data in members.items() if SECRET in data]
    refused = _quarantine(tmp_path / "out")
    assert set(refused) == {"abs", "dotdot", "link_out", "uri"}
    assert refused["dotdot"]["reason"] == (
        f"text_path: '../outside/dir/b.txt' resolves to {outside.resolve() / 'dir' / 'b.txt'}, "
        f"outside {src.resolve()} (the manifest's folder); pass --allow-outside "
        "(ingest.allow_outside) to let a manifest name files anywhere")
    assert f"'media/escape.txt' resolves to {outside.resolve() / 'secret.txt'}" in (
        refused["link_out"]["reason"])
    assert manifest["counts"]["in"] == 7 and manifest["counts"]["quarantined"] == 4

    trusted = ingest(IngestConfig(source=str(index), allow_outside=True), tmp_path / "trusted")
    assert trusted["counts"]["out"] == 7 and trusted["counts"]["quarantined"] == 0
    assert _members(tmp_path / "trusted")["dotdot.txt"] == SECRET


def test_allow_outside_flag_on_the_command_line(tmp_path, capsys):
    outside = _outside(tmp_path)
    (tmp_path / "src").mkdir()
    index = _manifest(tmp_path / "src" / "index.csv",
                      [{"key": "abs", "text_path": str(outside / "secret.txt")}])
    assert main(["ingest", str(index), "--out", str(tmp_path / "a")]) == 0
    assert "in 1 = out 0 + quarantined 1" in capsys.readouterr().out
    assert main(["ingest", str(index), "--out", str(tmp_path / "b"), "--allow-outside"]) == 0
    assert "in 1 = out 1 + quarantined 0" in capsys.readouterr().out


def test_members_over_the_size_cap_are_quarantined_unread(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_bytes(b"x" * 1000)
    (src / "big.wav").write_bytes(b"\0" * 1001)
    (src / "big.txt").write_text("the big sample's caption")
    (src / "bigjson.json").write_bytes(b" " * 1001 + b"{}")   # json is read at planning time
    read: list[str] = []
    for method in ("read_range", "read_bytes"):
        original = getattr(Location, method)

        def spy(self, *args, _original=original):
            read.append(self.path)
            return _original(self, *args)

        monkeypatch.setattr(Location, method, spy)

    manifest = ingest(IngestConfig(source=str(src), max_member_bytes=1000), tmp_path / "out")

    rows = _quarantine(tmp_path / "out")
    assert rows["big"]["reason"] == (
        f"{src / 'big.wav'} has 1001 bytes, over the max_member_bytes limit of 1000 "
        "(ingest.max_member_bytes, --max-member-bytes)")
    assert rows["big"]["origin"] == str(src / "big.wav")
    assert f"{src / 'bigjson.json'} has 1003 bytes" in rows["bigjson"]["reason"]
    assert not {str(src / "big.wav"), str(src / "bigjson.json")} & set(read)
    assert _members(tmp_path / "out")["small.txt"] == b"x" * 1000  # exactly the cap: taken
    assert (manifest["counts"]["out"], manifest["counts"]["quarantined"]) == (1, 2)


def test_size_cap_covers_manifest_text_and_shard_members(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    index = _manifest(tmp_path / "m" / "index.jsonl", [{"key": "long", "text": "y" * 2000}])
    assert main(["ingest", str(index), "--out", str(tmp_path / "a"),
                 "--max-member-bytes", "1KB"]) == 0
    assert "in 1 = out 0 + quarantined 1" in capsys.readouterr().out
    assert "has 2000 bytes, over the max_member_bytes limit of 1000" in (
        _quarantine(tmp_path / "a")["long"]["reason"])

    shard = tmp_path / "in.tar"
    with tarfile.open(shard, "w") as tar:
        for name, size in (("ok.txt", 10), ("huge.txt", 5000)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"z" * size))
    manifest = ingest(IngestConfig(source=str(shard), max_member_bytes=4096), tmp_path / "b")
    row = _quarantine(tmp_path / "b")["huge"]
    assert row["reason"].startswith(f"{shard}#huge.txt has 5000 bytes, over the")
    assert (manifest["counts"]["out"], manifest["counts"]["quarantined"]) == (1, 1)


def test_size_cap_default_and_validation():
    default = IngestConfig().max_member_bytes
    assert default == 256 * 2**20
    # What ingest writes, preprocess's shard reader must accept.
    assert default <= inspect.signature(read_shard).parameters["max_member_bytes"].default
    with pytest.raises(ValueError, match="max_member_bytes must be >= 1, got 0"):
        IngestConfig(max_member_bytes=0)


def test_a_source_named_through_a_link_is_read(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("hello")
    os.symlink(real, tmp_path / "via")
    manifest = ingest(IngestConfig(source=str(tmp_path / "via")), tmp_path / "out")
    assert manifest["counts"]["out"] == 1 and manifest["counts"]["quarantined"] == 0
