"""Shared fixtures: small synthetic *preprocessed* batches (the numpy columns of DESIGN.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmvq.config import TokenizerConfig
from mmvq.text_vocab import encode_text

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
}


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A coloured rectangle on a noise-textured grey background, and its caption."""
    coarse = rng.uniform(60, 140, size=(size // 8, size // 8, 1))
    background = np.kron(coarse, np.ones((8, 8, 3))) + rng.normal(0, 8, size=(size, size, 3))
    name, rgb = list(COLORS.items())[rng.integers(len(COLORS))]
    h, w = rng.integers(size // 6, size // 2, size=2)
    top, left = rng.integers(0, size - h), rng.integers(0, size - w)
    background[top : top + h, left : left + w] = rgb
    side = "left" if left + w / 2 < size / 2 else "right"
    big = "large" if h * w > (size * size) / 12 else "small"
    caption = f"a {big} {name} box on the {side}"
    return np.clip(background, 0, 255).astype(np.uint8), caption


def _audio(rng: np.random.Generator, num_samples: int, sample_rate: int) -> tuple[np.ndarray, int]:
    """A short sine or chirp, zero-padded to num_samples."""
    length = int(rng.integers(num_samples // 2, num_samples + 1))
    t = np.arange(length) / sample_rate
    f0, f1 = rng.uniform(150, 900, size=2)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))  # linear chirp f0 -> f1
    wav = np.zeros(num_samples, dtype=np.float32)
    wav[:length] = 0.5 * np.sin(phase)
    return wav, length


def make_preprocessed_batch(
    n: int, seed: int = 0, cfg: TokenizerConfig | None = None
) -> dict[str, np.ndarray]:
    """``n`` aligned synthetic samples as the preprocess stage emits them (all modalities on)."""
    cfg = cfg or TokenizerConfig()
    rng = np.random.default_rng(seed)
    images, audios, audio_lens, ids, text_lens, keys, texts = [], [], [], [], [], [], []
    for i in range(n):
        image, caption = _image(rng, cfg.image.image_size)
        wav, length = _audio(rng, cfg.audio.num_samples, cfg.audio.sample_rate)
        text_ids, text_len = encode_text(caption, cfg.text.max_len)
        images.append(image)
        audios.append(wav)
        audio_lens.append(length)
        ids.append(text_ids)
        text_lens.append(text_len)
        keys.append(f"sample-{seed}-{i:04d}")
        texts.append(caption)
    return {
        "key": np.array(keys),
        "image": np.stack(images),
        "audio": np.stack(audios),
        "audio_len": np.array(audio_lens, dtype=np.int64),
        "text_ids": np.stack(ids),
        "text_len": np.array(text_lens, dtype=np.int64),
        "has_image": np.ones(n, dtype=bool),
        "has_audio": np.ones(n, dtype=bool),
        "has_text": np.ones(n, dtype=bool),
        "text": np.array(texts, dtype=object),  # the caption as written (text tokens' source)
    }


@pytest.fixture
def make_batch():
    """Factory fixture: ``make_batch(n, seed=0, cfg=None) -> dict[str, np.ndarray]``."""
    return make_preprocessed_batch


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Seed torch per test, and run it on one thread.

    Tests must not depend on each other's random state. One thread: on the 2-core dev box torch's
    default of one thread per core oversubscribes the CPU as soon as anything else runs, and the
    small ops here gain nothing from a second thread anyway.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
