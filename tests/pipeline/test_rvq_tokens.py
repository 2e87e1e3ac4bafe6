"""Residual (rvq) audio tokens through the tokenize and evaluate code paths, without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from traindata import preprocessed_batch

from mmvq import MultimodalTokenizer, to_model_inputs
from mmvq.config import AudioCodecConfig, ImageCodecConfig, QuantizerConfig, TokenizerConfig
from mmvq.scoring import ReconstructionScores
from mmvq.vocabulary import split_interleaved
from pipeline.evaluate import _codes_for, _read_tokens
from pipeline.formats.checkpoint import TOKENIZER_DIR
from pipeline.formats.tokens import TokenEncoder
from pipeline.tokenize import TokenizeConfig

LEVELS = 3
MODEL = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                        audio=AudioCodecConfig(num_samples=2000, codebook_size=64),
                        audio_quantizer=QuantizerConfig(kind="rvq", num_levels=LEVELS))


def _rows(n: int, cfg: TokenizerConfig) -> dict[str, np.ndarray]:
    batch = preprocessed_batch(n, seed=4, cfg=cfg)
    return {**batch, "split": np.array(["val"] * n), "source_shard": np.array(["s0.tar"] * n)}


def _saved(tmp_path: Path, cfg: TokenizerConfig) -> tuple[MultimodalTokenizer, Path]:
    torch.manual_seed(0)
    model = MultimodalTokenizer(cfg).eval()
    model.save(tmp_path / TOKENIZER_DIR)
    return model, tmp_path / TOKENIZER_DIR


def test_tokenize_rows_carry_levels_and_evaluate_reads_them_back(tmp_path):
    model, model_dir = _saved(tmp_path, MODEL)
    batch = _rows(6, MODEL)
    encoder = TokenEncoder(str(model_dir), audio_levels=2)
    layout = encoder.layout  # the model's codebooks, the text range sized to the text ids
    table = encoder(batch)
    columns = table.to_pydict()
    assert columns["audio_levels"] == [2] * 6
    frames = model.config.audio.num_frames  # 2000 samples / hop 80 = 25
    assert all(len(v) == frames * 2 for v in columns["audio_tokens"])
    expected = model.encode(to_model_inputs(batch), audio_levels=2)["audio"].numpy()
    for i in range(6):
        audio = np.asarray(columns["audio_tokens"][i]).reshape(frames, 2)  # frame-major
        assert np.array_equal(audio, expected[i])
        back = split_interleaved(np.asarray(columns["interleaved_tokens"][i]), layout)
        n = columns["audio_frames"][i]  # the frames covering real audio
        assert back["audio"].shape == (n, 2) and np.array_equal(back["audio"], audio[:n])

    # Evaluate: the dataset's codes come back as (B, frames, 2) and score at both bitrates.
    (tmp_path / "tokens").mkdir()
    pq.write_table(table, tmp_path / "tokens" / "val.parquet")
    tokens = _read_tokens(tmp_path / "tokens")
    codes = _codes_for(batch["key"], tokens, model, text_ids=True)
    assert codes["audio"].shape == (6, frames, 2) and "text" not in codes
    assert torch.equal(codes["audio"], torch.from_numpy(expected))
    inputs = to_model_inputs(batch)
    codes["text"] = model.encode(inputs)["text"]  # as evaluate: the codec's own text codes
    scores = ReconstructionScores(model.codebook_sizes(), model.config.audio.sample_rate)
    scores.add(inputs, model.decode(codes), codes, {})
    scores.add_bitrates(inputs, model, codes["audio"])
    summary = scores.summary()
    for key in ("audio/si_snr_levels1", "audio/si_snr_levels2", "audio/codebook_usage",
                "audio/codebook_usage_level0", "audio/codebook_perplexity_level1",
                "cross/nmi_audio_text"):
        assert np.isfinite(summary[key]), key
    assert "audio/si_snr_levels3" not in summary  # only the levels the dataset holds
    assert summary["audio/si_snr_levels2"] == pytest.approx(summary["audio/si_snr"])


def test_one_level_audio_rows_say_one_level(tmp_path):
    plain = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                            audio=AudioCodecConfig(num_samples=2000))
    _, model_dir = _saved(tmp_path, plain)
    table = TokenEncoder(str(model_dir))(_rows(2, plain))
    assert table.column("audio_levels").to_pylist() == [1, 1]
    assert TokenizeConfig().audio_levels is None  # default: every level the model has
