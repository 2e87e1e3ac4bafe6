"""Stage outputs: fingerprints and atomic commits."""

from dataclasses import dataclass

import pytest

from pipeline.stage import (
    StageOutput,
    StageSpec,
    committed_dir,
    fingerprint,
    read_record,
    run_committed,
)


@dataclass(frozen=True)
class Cfg:
    n: int = 1


def test_fingerprint_changes_with_config_inputs_and_code():
    base = fingerprint("s", Cfg(1), {"a": "f1"}, "code1")
    assert base == fingerprint("s", Cfg(1), {"a": "f1"}, "code1")
    assert base != fingerprint("s", Cfg(2), {"a": "f1"}, "code1")
    assert base != fingerprint("s", Cfg(1), {"a": "f2"}, "code1")
    assert base != fingerprint("s", Cfg(1), {"a": "f1"}, "code2")
    assert base != fingerprint("t", Cfg(1), {"a": "f1"}, "code1")


def _writer(config, ctx):
    (ctx.output_dir / "data.txt").write_text(str(config.n))
    return {"n": config.n}


def test_commit_makes_output_visible_with_record(tmp_path):
    spec = StageSpec("w", Cfg, _writer)
    out, summary = run_committed(spec, Cfg(3), StageOutput(tmp_path, "w", "fp1"), record={"fingerprint": "fp1"})
    assert out == committed_dir(tmp_path, "w", "fp1")
    assert (out / "data.txt").read_text() == "3"
    assert read_record(out) == {"fingerprint": "fp1", "summary": {"n": 3}}
    assert summary == {"n": 3}


def test_failed_stage_leaves_nothing(tmp_path):
    def broken(config, ctx):
        (ctx.output_dir / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_committed(StageSpec("b", Cfg, broken), Cfg(), StageOutput(tmp_path, "b", "fp"), record={})
    assert list((tmp_path / "b").iterdir()) == []
    assert read_record(committed_dir(tmp_path, "b", "fp")) is None


def test_code_version_depends_on_the_named_modules_only():
    assert StageSpec("a", Cfg, _writer, code=("pipeline.config",)).code_version() == \
        StageSpec("b", Cfg, _writer, code=("pipeline.config",)).code_version()
    assert StageSpec("a", Cfg, _writer, code=("pipeline.config",)).code_version() != \
        StageSpec("a", Cfg, _writer, code=("pipeline.tracking",)).code_version()


def test_code_version_covers_library_versions(monkeypatch):
    import importlib.metadata

    spec = StageSpec("w", Cfg, _writer, code=("pipeline.stage",), libraries=("torch", "pillow"))
    before = spec.code_version()
    assert set(spec.library_versions()) >= {"mmvq", "numpy", "pyarrow", "torch", "pillow"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "pillow" else real(name))
    assert spec.library_versions()["pillow"] == "99.0"
    assert spec.code_version() != before  # a Pillow upgrade reruns the stage


def test_every_stage_declares_the_libraries_that_change_its_output():
    from workflows.stages import STAGES

    wanted = {"preprocess": {"soxr", "pillow", "soundfile", "numpy", "pyarrow", "mmvq"},
              "train": {"torch", "torchvision", "torchaudio", "numpy", "mmvq"},
              "tokenize": {"torch", "torchvision", "torchaudio", "pyarrow", "mmvq"}}
    for name, libraries in wanted.items():
        assert libraries <= set(STAGES[name].library_versions()), name


def test_a_stage_defined_outside_our_packages_fingerprints_its_own_file(tmp_path):
    """A stage whose run function lives in a user's module (here: this test file) hashes that
    file and what it imports of ours; editing it changes the code version."""
    spec = StageSpec("mine", Cfg, _writer)  # code defaults to the module of _writer: this file
    assert spec.code_version() == StageSpec("again", Cfg, _writer).code_version()
    assert spec.code_version() != StageSpec("w", Cfg, _writer, code=("pipeline.config",)).code_version()
