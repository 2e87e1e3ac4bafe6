"""The mmvq command: help on every subcommand, clear errors for bad arguments."""

import pytest

from workflows.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["stage", "--help"],
                                  ["synth", "--help"]])
def test_help_text(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: mmvq" in capsys.readouterr().out


def test_unknown_stage_and_bad_override(tmp_path, capsys):
    assert main(["stage", "nope", "--data-root", str(tmp_path)]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["run", "workflows/demo.yaml", "train.steps=abc"]) == 2
    assert "stages.train.config.steps must be int, got 'abc'" in capsys.readouterr().err


def test_synth_command_writes_shards(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "shards"), "--num-samples", "6"]) == 0
    assert sorted(p.name for p in (tmp_path / "shards").rglob("*.tar"))
    assert (tmp_path / "shards" / "manifest.json").is_file()
