"""The token dataset reader (pipeline.formats.tokens): paths, interleaved streams, codes, checks."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmvq import MultimodalTokenizer, TokenizerConfig
from pipeline.file_tokens import FileTokenizer
from pipeline.formats.tokens import (
    check_token_dataset,
    model_codes,
    read_manifest,
    read_token_dataset,
    split_interleaved_column,
)
from pipeline.tracking import mlflow_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A token dataset laid out as tokenize writes it, rows from the real encoder."""
    root = tmp_path_factory.mktemp("tokens")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "model")
    codec = FileTokenizer(root / "model")
    rng = np.random.default_rng(0)
    counts = {}
    for split, n in (("train", 3), ("val", 2)):
        samples = []
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
            samples.append({"key": f"{split}-{i}", "image": png.getvalue(),
                            "text": f"caption {i}" * (i + 1), "source": f"{split}.tar"})
        (root / "out" / "tokens" / split).mkdir(parents=True)
        pq.write_table(codec.encode(samples), root / "out" / "tokens" / split / "part.parquet")
        counts[split] = n
    manifest = {"counts": counts, "splits": sorted(counts), "vocabulary": codec.layout,
                "source_shards": ["train.tar", "val.tar"]}
    (root / "out" / "manifest.json").write_text(json.dumps(manifest))
    return root / "out", codec


def test_reader_accepts_the_output_its_tokens_dir_or_a_split(dataset):
    out, _ = dataset
    assert read_token_dataset(out).num_rows == 5
    assert read_token_dataset(out / "tokens", split="val").num_rows == 2
    assert read_token_dataset(out / "tokens" / "train", columns=["key"]).column_names == ["key"]
    assert read_manifest(out / "tokens" / "val")["counts"] == {"train": 3, "val": 2}
    with pytest.raises(FileNotFoundError, match="no split 'test'"):
        read_token_dataset(out, split="test")
    with pytest.raises(FileNotFoundError, match="not a token dataset"):
        read_token_dataset(out.parent / "model")


def test_interleaved_column_splits_into_the_code_columns(dataset):
    out, codec = dataset
    table = read_token_dataset(out, split="val")
    parts = split_interleaved_column(table.column("interleaved_tokens"),
                                     read_manifest(out)["vocabulary"])
    rows = table.to_pylist()
    for row, part in zip(rows, parts, strict=True):
        assert part["image"].tolist() == row["image_tokens"]
        assert "audio" not in part  # the samples have no audio
        assert part["text"].tolist() == row["text_tokens"][:len(part["text"])]
    assert [len(p["text"]) for p in parts] == [len("caption 0"), 2 * len("caption 1")]
    layout = read_manifest(out)["vocabulary"]
    codes = model_codes(table.to_pydict(), codec.model.token_shapes(), layout)
    # Text tokens are the captions' ids, which the vocabulary decodes, not the model.
    assert set(codes) == {"image"} and codes["image"].shape == (2, 8, 8)
    assert [bytes(r["text_tokens"]).decode() for r in rows] == ["caption 0", "caption 1" * 2]
    assert codes["image"][1].reshape(-1).tolist() == rows[1]["image_tokens"]


def test_check_passes_and_catches_disagreements(dataset, tmp_path):
    out, _ = dataset
    assert check_token_dataset(out) == {"train": 3, "val": 2}
    manifest = read_manifest(out)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "counts": {"train": 3,
                                                                              "val": 9}}))
    with pytest.raises(ValueError, match="split val has 2 rows, manifest says 9"):
        check_token_dataset(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    table = pq.read_table(broken / "tokens" / "val" / "part.parquet").to_pylist()
    table[1]["image_tokens"][0] = 256  # one past the image codebook
    schema = pq.read_schema(out / "tokens" / "val" / "part.parquet")
    pq.write_table(pa.Table.from_pylist(table, schema=schema),
                   broken / "tokens" / "val" / "part.parquet")
    with pytest.raises(ValueError, match=r"key val-1: image_tokens outside \[0, 256\)"):
        check_token_dataset(broken)


def test_mlflow_dataset_names_the_location_and_changes_with_the_data(dataset, tmp_path):
    out, _ = dataset
    first = mlflow_dataset(out / "tokens" / "val", "tokens-val", location="/data/tokens/val")
    assert json.loads(first.to_dict()["source"]) == {"uri": "/data/tokens/val"}
    assert "interleaved_tokens" in first.to_dict()["schema"]
    assert mlflow_dataset(out / "tokens" / "val", "tokens-val").digest == first.digest
    assert mlflow_dataset(out / "tokens" / "train", "tokens-val").digest != first.digest


def test_webdataset_output_holds_the_parquet_rows(dataset, tmp_path):
    import webdataset

    from pipeline.tokenize import _write_webdataset

    out, _ = dataset
    _write_webdataset(out / "tokens" / "train", tmp_path / "wds", samples_per_shard=2)
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("shard-*.tar"))
    assert len(shards) == 2  # 3 rows, 2 per shard
    rows = [json.loads(s["json"]) for s in webdataset.WebDataset(shards, shardshuffle=False)]
    expected = read_token_dataset(out, "train").to_pylist()
    assert sorted(rows, key=lambda r: r["key"]) == sorted(expected, key=lambda r: r["key"])
