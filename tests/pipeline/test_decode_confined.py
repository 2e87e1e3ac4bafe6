"""``mmvq decode`` writes only under ``--out``, whatever keys a token file holds.

A token file comes from someone else; each row's key names the files decode writes. The rows
here are real: samples encoded by the tokenize stage's own actor (through
:class:`pipeline.file_tokens.FileTokenizer`), written as a token dataset (``tokens/SPLIT/*.parquet`` in the
token schema, ``manifest.json`` beside it), with one good key and one hostile key.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from own_lines import own_stderr_lines
from PIL import Image

from mmvq import MultimodalTokenizer, TokenizerConfig
from pipeline.file_tokens import FileTokenizer, write_sample
from pipeline.formats.tokens import MANIFEST, TOKEN_SCHEMA, TOKENS_DIR
from workflows.cli import main

GOOD = "cats/tabby"  # a nested key is fine: it stays inside --out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("confined-model")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def row(model_dir) -> dict:
    """One token row (image, audio and text) as the tokenize stage's actor writes it."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    image = io.BytesIO()
    Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1)).save(image, "PNG")
    t = np.arange(8000) / 8000
    audio = io.BytesIO()
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000,
                    format="WAV")
    sample = {"key": "x", "image": image.getvalue(), "audio": audio.getvalue(),
              "text": "a grey ramp"}
    return FileTokenizer(model_dir).encode([sample]).to_pylist()[0]


def _token_dataset(root: Path, row: dict, keys: list[str]) -> Path:
    """A tokenize output holding ``row`` once per key: tokens/train/*.parquet + manifest."""
    split = root / TOKENS_DIR / "train"
    split.mkdir(parents=True)
    table = pa.Table.from_pylist([{**row, "key": key} for key in keys], schema=TOKEN_SCHEMA)
    pq.write_table(table, split / "part-00000.parquet")
    (root / MANIFEST).write_text(json.dumps({"counts": {"train": len(keys)},
                                             "splits": ["train"], "total": len(keys)}))
    return root


def _tree(root: Path) -> set[Path]:
    """Every file and folder under ``root``, links not followed."""
    return set(root.rglob("*"))


# (name, key or a function of the test's folder giving it, what the refusal says)
HOSTILE = [
    ("absolute", lambda tmp: str(tmp / "outside" / "absolute" / "x"),
     "is not a relative path inside the output folder"),
    ("dotdot", lambda tmp: "../escape/dotdot", "is not a relative path inside the output folder"),
    ("backslash", lambda tmp: "..\\escape\\backslash", "contains a backslash"),
    ("nul", lambda tmp: "nul\x00key", "contains a control character"),
    ("newline", lambda tmp: "line\nmmvq decode: forged report", "contains a control character"),
    ("through_link", lambda tmp: "link/through_link", "leads outside the output folder"),
]


@pytest.mark.parametrize(("key_of", "reason"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_key_is_refused_and_nothing_lands_outside_out(
        model_dir, row, tmp_path, capsys, key_of, reason):
    key = key_of(tmp_path)
    tokens = _token_dataset(tmp_path / "tokens", row, [GOOD, key])
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (out / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    before = _tree(tmp_path)

    args = ["decode", str(tokens), "--model", str(model_dir), "--out", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = own_stderr_lines(captured.err)
    assert len(lines) == 1, captured.err  # one line: a newline in a key forges none
    # The row names the whole key; the reason quotes at most 80 characters of it.
    assert lines[0].startswith(f"mmvq decode: {tokens} row 1 (key {key!r}): key "), lines[0]
    assert reason in lines[0]
    assert captured.out.startswith("decoded 1 samples, 1 bad (reasons above) into 3 files")
    # The good row is written; nothing else appeared anywhere, inside --out or out of it.
    good = {out / "cats" / f"tabby.{ext}" for ext in ("png", "wav", "txt")}
    assert _tree(tmp_path) - before == good | {out / "cats"}
    assert list((tmp_path / "outside").iterdir()) == []
    assert not (tmp_path / "work" / "escape").exists()
    # --skip-bad: the same refusal, a successful exit.
    assert main([*args, "--skip-bad"]) == 0
    assert reason in capsys.readouterr().err
    assert _tree(tmp_path) - before == good | {out / "cats"}


def test_keys_inside_out_are_written_where_they_say(model_dir, row, tmp_path):
    """Not over-refusing: nested keys, dots inside names, unicode and a link that stays inside
    ``--out`` are all fine."""
    out = tmp_path / "out"
    (out / "inside").mkdir(parents=True)
    (out / "alias").symlink_to(out / "inside", target_is_directory=True)
    sample = FileTokenizer(model_dir).decode({k: [v] for k, v in row.items()})[0]
    rate = 8000
    for key in ("a/b/c", "v1.2..final", "猫/café", "./dot/x", "alias/y"):
        written = write_sample({**sample, "key": key}, rate, out)
        assert len(written) == 3 and all(p.resolve().is_relative_to(out.resolve())
                                         for p in written)
    assert (out / "inside" / "y.png").is_file() and (out / "dot" / "x.txt").is_file()
