"""`mmvq --help` answers at once: no torch, Ray or MLflow is imported for any help text."""

import json
import subprocess
import sys

import pytest

COMMANDS = ["run", "status", "submit", "stage", "synth", "ingest", "quarantine", "encode",
            "decode"]
HEAVY = ("torch", "ray", "mlflow", "torchaudio", "torchvision", "pandas")

PROBE = """
import contextlib, io, json, sys
from workflows.cli import main
for argv in [["--help"]] + [[c, "--help"] for c in {commands!r}]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, argv
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def test_help_imports_no_heavy_library():
    probe = PROBE.format(commands=COMMANDS, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_stage_help_lists_every_registered_stage(capsys):
    from workflows.cli import STAGE_HELP, main
    from workflows.stages import STAGES

    assert list(STAGE_HELP) == list(STAGES)
    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    text = capsys.readouterr().out
    for name in STAGES:
        assert f"  {name} " in text
