"""Spoken scenes: a deterministic demo dataset of aligned image, speech and caption.

Each sample is one to three coloured shapes on a textured background (PNG), a caption naming them
and their spatial relation (TXT), that caption spoken by eSpeak NG (16-bit FLAC) and metadata
(JSON), written as webdataset shards with a manifest::

    from pipeline.synth import SynthConfig, run
    manifest = run(SynthConfig(num_samples=768, seed=0), Path("runs/demo/synth"))
"""

from pipeline.synth.writer import SynthConfig, run

__all__ = ["SynthConfig", "run"]
