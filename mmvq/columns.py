"""The columns of the preprocessed batch that the model reads (DESIGN.md, "Preprocessed batch").

Its own torch-free module: a driver that selects these columns from parquet (the train stage,
before any worker starts) must not pay the second and a half that importing torch takes.
"""

from __future__ import annotations

# Anything else in the batch (e.g. ``key``) is ignored by the model.
MODEL_COLUMNS = (
    "image",
    "audio",
    "audio_len",
    "text_ids",
    "text_len",
    "has_image",
    "has_audio",
    "has_text",
)
