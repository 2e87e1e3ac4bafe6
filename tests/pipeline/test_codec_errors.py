"""``mmvq encode`` / ``mmvq decode`` when something is wrong: the registry, a file, a token row.

Real data throughout: scikit-image's bundled photographs, stereo FLAC / OGG tones at 44.1 and
22.05 kHz, unicode captions, a model registered by the register stage into a SQLite store.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from mlflow.tracking import MlflowClient
from own_lines import own_stderr_lines
from PIL import Image
from skimage import data

from mmvq import MultimodalTokenizer, TokenizerConfig
from pipeline.file_tokens import BadInput, FileTokenizer, resolve_model
from pipeline.register import RegisterConfig, run
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger, ensure_experiment
from workflows.cli import main

NAME = "codec-errors-tokenizer"


def _tone(seconds: float, rate: int, hz: float) -> np.ndarray:
    """(frames, 2) stereo: the tone left, its fifth right, so a channel mix-up would show."""
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.stack([np.sin(2 * np.pi * hz * t), np.sin(2 * np.pi * 1.5 * hz * t)], 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codec-errors-model")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "train" / "tokenizer")
    return root / "train"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three good samples: a photo with stereo FLAC, caption and json; a JPEG with stereo OGG;
    a greyscale photo with a caption."""
    folder = tmp_path_factory.mktemp("codec-errors-photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    soundfile.write(folder / "astronaut.flac", _tone(1.0, 44100, 440), 44100)
    (folder / "astronaut.txt").write_text("一只猫 🐱 café", encoding="utf-8")
    (folder / "astronaut.json").write_text(json.dumps({"split": "val"}))
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=90)
    soundfile.write(folder / "coffee.ogg", _tone(0.7, 22050, 330), 22050, format="OGG",
                    subtype="VORBIS")
    Image.fromarray(data.camera()).save(folder / "camera.png")  # mode L: becomes RGB
    (folder / "camera.txt").write_text("un caméraman, 摄影师", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model_dir) -> tuple[str, dict]:
    """The tokenizer registered by the register stage into a SQLite store; (uri, record)."""
    root = tmp_path_factory.mktemp("codec-errors-registry")
    uri = f"sqlite:///{root / 'registry.db'}"
    (root / "evaluate").mkdir()
    (root / "evaluate" / "metrics.json").write_text(json.dumps({"trained": {"image/psnr": 20.0}}))
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "codec", root / "artifacts")).info.run_id
    ctx = StageContext(output_dir=root / "out", inputs={"model": model_dir,
                                                        "evaluation": root / "evaluate"},
                       logger=RunLogger(uri, run_id), tracking_uri=uri)
    ctx.output_dir.mkdir()
    return uri, run(RegisterConfig(name=NAME), ctx)


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    """No MLflow URI in the environment and an empty working directory, which is returned."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ----------------------------------------------------------------------------- the registry

def test_registered_model_is_found_and_read_through_tracking_uri_only(
        registry, model_dir, photos, tmp_path, clean_env, capsys):
    uri, record = registry
    out = tmp_path / "t.json"
    assert main(["encode", str(photos), "--model", f"models:/{NAME}/1", "--tracking-uri", uri,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["tokenizer"] == record["tokenizer_id"]
    assert [r["key"] for r in doc["samples"]] == ["astronaut", "camera", "coffee"]
    # The registered copy encodes exactly as the tokenizer it was registered from.
    local = tmp_path / "local.json"
    assert main(["encode", str(photos), "--model", str(model_dir), "--out", str(local)]) == 0
    assert json.loads(local.read_text(encoding="utf-8"))["samples"] == doc["samples"]
    assert main(["decode", str(out), "--model", f"models:/{NAME}/latest", "--tracking-uri", uri,
                 "--out", str(tmp_path / "decoded")]) == 0
    assert len(list((tmp_path / "decoded").iterdir())) == 7  # 3 images, 2 clips, 2 captions
    # MLflow's own default store (./mlflow.db, ./mlruns) was never touched.
    assert list(clean_env.iterdir()) == []


def test_logged_model_id_uri_is_read_through_tracking_uri(registry, clean_env):
    uri, _ = registry
    source = MlflowClient(uri, registry_uri=uri).get_model_version(NAME, "1").source
    assert source.startswith("models:/m-")  # MLflow 3 registers a version from a logged model
    assert (resolve_model(source, uri) / "config.json").is_file()
    assert list(clean_env.iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize(("model", "store", "expected"), [
    ("models:/no-such-model/1", "registry", "Registered Model with name=no-such-model not found"),
    (f"models:/{NAME}/9", "registry", f"Model Version (name={NAME}, version=9) not found"),
    (f"models:/{NAME}/1", "typo", "no MLflow store at sqlite:///"),
    (f"models:/{NAME}/1", "unreachable", "Max retries exceeded"),
])
def test_registry_errors_are_one_line_with_exit_2(registry, photos, tmp_path, clean_env,
                                                  capsys, model, store, expected):
    uri = {"registry": registry[0], "typo": f"sqlite:///{tmp_path / 'typo.db'}",
           "unreachable": f"http://127.0.0.1:{_closed_port()}"}[store]
    assert main(["encode", str(photos), "--model", model, "--tracking-uri", uri,
                 "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmvq encode: {model}: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "typo.db").exists()  # a typo creates no empty store
    assert not (tmp_path / "t.json").exists()
    assert list(clean_env.iterdir()) == []


# ----------------------------------------------------------------------------- bad files

@pytest.fixture
def mixed(photos, tmp_path) -> tuple[Path, dict[str, str]]:
    """The good photos plus bad files; returns the folder and bad file -> expected reason."""
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    png = (photos / "astronaut.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[:len(png) // 3])
    (folder / "garbage.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "hiss.flac").write_bytes(b"fLaC but not really")
    (folder / "bad-split.txt").write_text("a caption", encoding="utf-8")
    (folder / "bad-split.json").write_text(json.dumps({"split": "../../etc"}))
    Image.fromarray(data.coffee()).save(folder / "twin.png")
    Image.fromarray(data.coffee()).save(folder / "twin.jpg")
    expected = {
        str(folder / "truncated.png"): "image: cannot decode",
        str(folder / "garbage.png"): "image: cannot decode",
        str(folder / "hiss.flac"): "audio: cannot decode",
        str(folder / "bad-split.json"): "json: split '../../etc' is not a plain name",
        f"{folder / 'twin.jpg'}, {folder / 'twin.png'}": "two image files for sample 'twin'",
        str(tmp_path / "missing.wav"): "no such file or folder",
    }
    return folder, expected


def _check_reports(err: str, command: str, expected: dict[str, str]) -> None:
    """One stderr line per bad item, starting with its file(s), with no object repr."""
    lines = own_stderr_lines(err.strip())
    assert len(lines) == len(expected), err
    for where, reason in expected.items():
        assert any(line.startswith(f"mmvq {command}: {where}: {reason}") for line in lines), \
            f"{where}: {reason!r} not in\n{err}"
    assert "object at 0x" not in err and "Traceback" not in err


def test_bad_files_are_reported_and_the_good_samples_still_encoded(
        model_dir, mixed, tmp_path, capsys):
    folder, expected = mixed
    out = tmp_path / "t.json"
    args = ["encode", str(folder), str(tmp_path / "missing.wav"), "--model", str(model_dir)]
    assert main([*args, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    _check_reports(captured.err, "encode", expected)
    assert captured.out.strip().startswith("encoded 3 samples, 6 bad (reasons above)")
    rows = json.loads(out.read_text(encoding="utf-8"))["samples"]
    assert [r["key"] for r in rows] == ["astronaut", "camera", "coffee"]
    assert all(r["image_tokens"] for r in rows)
    # --skip-bad: the same report and rows, but a successful exit.
    assert main([*args, "--out", str(tmp_path / "t.parquet"), "--skip-bad"]) == 0
    _check_reports(capsys.readouterr().err, "encode", expected)
    assert main(["decode", str(tmp_path / "t.parquet"), "--model", str(model_dir),
                 "--out", str(tmp_path / "decoded")]) == 0
    assert sorted(p.stem for p in (tmp_path / "decoded").iterdir()) == [
        "astronaut", "astronaut", "astronaut", "camera", "camera", "coffee", "coffee"]


def test_prepare_names_the_file_instead_of_the_stream(model_dir):
    codec = FileTokenizer(model_dir / "tokenizer")
    sample = {"key": "x", "image": b"\x89PNG not really", "image_file": "in/x.png",
              "text": "fine", "text_file": "in/x.txt"}
    with pytest.raises(BadInput) as caught:
        codec.prepare(sample)
    message = str(caught.value)
    assert message.startswith("in/x.png: image: cannot decode") and "object at" not in message
    assert "BytesIO" not in message
    # Without files (the registered model's predict), the key names the sample.
    with pytest.raises(BadInput, match=r"^sample 'y': no image, audio or text$"):
        codec.prepare({"key": "y", "json": b'{"split": "val"}'})


# ----------------------------------------------------------------------------- bad token rows

def test_bad_token_rows_are_reported_and_the_good_ones_decoded(model_dir, photos, tmp_path,
                                                               capsys):
    tokens = tmp_path / "t.json"
    assert main(["encode", str(photos), "--model", str(model_dir), "--out", str(tokens)]) == 0
    capsys.readouterr()
    doc = json.loads(tokens.read_text(encoding="utf-8"))
    good = doc["samples"]
    short = {**good[1], "key": "short", "image_tokens": good[1]["image_tokens"][:10]}
    outside = {**good[1], "key": "outside", "image_tokens": [9999] * 64}
    escape = {**good[2], "key": "../../escape"}
    doc["samples"] = [good[0], short, good[1], outside, escape, good[2]]
    tokens.write_text(json.dumps(doc), encoding="utf-8")
    out = tmp_path / "nested" / "decoded"
    args = ["decode", str(tokens), "--model", str(model_dir), "--out", str(out),
            "--batch-size", "4"]  # a bad row in each batch
    assert main(args) == 1
    captured = capsys.readouterr()
    _check_reports(captured.err, "decode", {
        f"{tokens} row 1 (key 'short')": "image_tokens has 10 codes; the tokenizer expects 64",
        f"{tokens} row 3 (key 'outside')": "image_tokens: code 9999 is not in the codebook",
        f"{tokens} row 4 (key '../../escape')": "key '../../escape' is not a relative path"})
    assert captured.out.startswith("decoded 3 samples, 3 bad (reasons above) into 7 files")
    assert sorted(p.name for p in out.iterdir()) == [
        "astronaut.png", "astronaut.txt", "astronaut.wav", "camera.png", "camera.txt",
        "coffee.png", "coffee.wav"]
    assert [p.name for p in tmp_path.rglob("escape*")] == []
    assert main([*args, "--skip-bad"]) == 0
