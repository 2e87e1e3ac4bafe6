"""``mmvq encode`` / ``mmvq decode`` on real files with a real (untrained) tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import soundfile
import torch
from PIL import Image

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.vocabulary import split_interleaved
from pipeline.file_tokens import LAYOUT_KEY, FileTokenizer, collect_samples, resolve_model
from pipeline.formats.samples import Resamplers, preprocess_sample
from pipeline.preprocess import PreprocessConfig
from workflows.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec-model")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "train" / "tokenizer")
    return root / "train"  # a train stage output: the tokenizer is in tokenizer/


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec-inputs")
    rng = np.random.default_rng(1)
    # Not square and not 64 px: encode must center-crop and resize like preprocess.
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    soundfile.write(folder / "a.wav", rng.normal(0, 0.1, 22050).astype(np.float32), 22050)
    (folder / "a.txt").write_text("a small red circle\n")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("only text")
    (folder / "notes.md").write_text("ignored: not an image, audio or text file")
    return folder


def test_encode_gives_the_models_codes_for_preprocessed_files(model_dir, inputs, tmp_path):
    assert main(["encode", str(inputs), "--model", str(model_dir),
                 "--out", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    rows = {r["key"]: r for r in doc["samples"]}
    assert sorted(rows) == ["a", "b", "sub/c"]
    assert rows["b"]["audio_tokens"] == [] and rows["b"]["text_tokens"] == []
    assert rows["sub/c"]["image_tokens"] == [] and rows["sub/c"]["image_grid"] == []
    # Independently: preprocess the files, encode with the model, compare.
    model = MultimodalTokenizer.load(model_dir / "tokenizer")
    cfg = PreprocessConfig(audio_samples=20000, required=())
    raw = {"png": (inputs / "a.png").read_bytes(), "wav": (inputs / "a.wav").read_bytes(),
           "txt": (inputs / "a.txt").read_bytes()}
    row = preprocess_sample(raw, cfg, Resamplers(8000))
    batch = {k: np.asarray(v)[None] for k, v in row.items() if k != "split"}
    codes = model.encode(to_model_inputs(batch))
    assert rows["a"]["image_tokens"] == codes["image"][0].reshape(-1).tolist()
    assert rows["a"]["audio_tokens"] == codes["audio"][0].tolist()
    assert rows["a"]["audio_frames"] == -(-int(row["audio_len"]) // 80)  # 1 s at 8 kHz: 100
    parts = split_interleaved(np.asarray(rows["a"]["interleaved_tokens"]), doc["vocabulary"])
    assert len(parts["text"]) == len("a small red circle")
    assert doc["tokenizer"] == f"local:{model.weights_hash()[:16]}"


def test_parquet_round_trip_and_decode_to_files(model_dir, inputs, tmp_path):
    assert main(["encode", str(inputs), "--model", str(model_dir),
                 "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.num_rows == 3
    assert json.loads(table.schema.metadata[LAYOUT_KEY])["vocabulary"]["vocab_size"] > 768
    out = tmp_path / "decoded"
    assert main(["decode", str(tmp_path / "t.parquet"), "--model", str(model_dir),
                 "--out", str(out)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png", "a.txt", "a.wav", "b.png", "sub/c.txt"]
    assert Image.open(out / "a.png").size == (64, 64)
    wave, rate = soundfile.read(out / "a.wav")
    assert rate == 8000 and len(wave) == 100 * 80  # the real frames only
    # The decoded text is what the model's text decoder gives for those codes.
    codec = FileTokenizer(model_dir / "tokenizer")
    expected = codec.decode(table.slice(0, 1).to_pydict())[0]["text"]
    assert (out / "a.txt").read_text() == expected + "\n"


def test_errors_name_the_problem(model_dir, inputs, tmp_path, capsys, monkeypatch):
    torch.manual_seed(1)
    MultimodalTokenizer(TokenizerConfig()).save(tmp_path / "other")
    assert main(["encode", str(inputs / "a.png"), "--model", str(model_dir),
                 "--out", str(tmp_path / "a.json")]) == 0
    assert main(["decode", str(tmp_path / "a.json"), "--model", str(tmp_path / "other"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "written by tokenizer ['local:" in capsys.readouterr().err
    assert main(["encode", str(inputs), "--model", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "a.json")]) == 2
    assert "not a tokenizer" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="needs --tracking-uri"):
        resolve_model("models:/x/1")
    (tmp_path / "dup").mkdir()
    for ext in ("png", "jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "dup" / f"x.{ext}")
    samples, bad = collect_samples([tmp_path / "dup"])
    twins = f"{tmp_path / 'dup' / 'x.jpg'}, {tmp_path / 'dup' / 'x.png'}"
    assert samples == [] and [str(b) for b in bad] == [f"{twins}: two image files for sample 'x'"]


def test_split_from_the_samples_json_reaches_json_and_parquet_rows(model_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "night").mkdir(parents=True)
    rate = 44100
    t = np.arange(rate // 2) / rate
    stereo = 0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1)
    Image.fromarray(skimage.data.astronaut()).save(folder / "cat.png")
    soundfile.write(folder / "cat.flac", stereo, rate)
    (folder / "cat.txt").write_text("一只猫 🐱 café", encoding="utf-8")
    (folder / "cat.json").write_text(json.dumps({"split": "val", "license": "CC0"}))
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg")
    (folder / "coffee.json").write_text(json.dumps({"source": "skimage"}))  # names no split
    Image.fromarray(skimage.data.camera()).save(folder / "night" / "camera.png")
    (folder / "night" / "camera.json").write_text(json.dumps({"split": "test"}))
    (folder / "orphan.json").write_text(json.dumps({"split": "val"}))  # describes nothing
    expected = {"cat": "val", "coffee": "train", "night/camera": "test"}
    for name in ("t.json", "t.parquet"):
        assert main(["encode", str(folder), "--model", str(model_dir),
                     "--out", str(tmp_path / name)]) == 0
    rows = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["samples"]
    assert {r["key"]: r["split"] for r in rows} == expected
    table = pq.read_table(tmp_path / "t.parquet", columns=["key", "split"]).to_pydict()
    assert dict(zip(table["key"], table["split"], strict=True)) == expected
    # The caption survived: its interleaved text run has one id per UTF-8 byte.
    parts = split_interleaved(np.asarray(rows[0]["interleaved_tokens"]),
                              FileTokenizer(model_dir / "tokenizer").layout)
    assert len(parts["text"]) == len("一只猫 🐱 café".encode())
