"""Raw samples for the registered tokenizer's predict, shared by its tests."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import soundfile
from PIL import Image


def raw_samples(n: int) -> pd.DataFrame:
    """``n`` raw samples as the registered model's predict takes them: PNG bytes, FLAC bytes at
    16 kHz of growing length, a caption; sample 1 has no image."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image, "PNG")
        audio = io.BytesIO()
        soundfile.write(audio, rng.normal(0, 0.1, 16000 + 999 * i).astype(np.float32), 16000,
                        format="FLAC")  # another rate and container: resampled like training
        rows.append({"key": f"s{i}", "image": image.getvalue(), "audio": audio.getvalue(),
                     "text": f"caption number {i}"})
    rows[1]["image"] = None  # a sample without an image
    return pd.DataFrame(rows)
