"""Bad values fail when the workflow is planned, as one line naming the key, before any stage
runs (issue 13, item 8). Each case below used to pass planning: some committed bad data
(``preprocess.image_size=0``: empty images marked as present), others failed with a traceback
after the upstream stages had run, and ``train.num_workers=64`` waited for ever."""

from __future__ import annotations

import socket

import pytest
from own_lines import own_stderr_lines

from workflows.cli import main

BAD = [
    ("train.lr=-1", "train.lr must be > 0, got -1"),
    ("train.lr=0", "train.lr must be > 0, got 0"),
    ("train.betas=[0.9,1.5]", "train.betas[1] must be in [0, 1), got 1.5"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1], got 2"),
    ("train.grad_clip=0", "train.grad_clip must be > 0, got 0"),
    ("train.decay_steps=0", "train.decay_steps must be >= 1, got 0"),
    ("tokenize.batch_size=0", "tokenize.batch_size must be >= 1, got 0"),
    ("tokenize.num_actors=0", "tokenize.num_actors must be >= 1, got 0"),
    ("tokenize.audio_levels=0", "tokenize.audio_levels must be >= 1, got 0"),
    ("evaluate.batch_size=0", "evaluate.batch_size must be >= 1, got 0"),
    ("evaluate.num_cpus=0", "evaluate.num_cpus must be > 0, got 0"),
    ("evaluate.split=../val", "evaluate.split '../val' is not a split name"),
    ("evaluate.split=nosuch", ("evaluate.split='nosuch': its input 'data' (stage preprocess) "
                              "has splits train, val")),
    ("synth.val_fraction=0", ("evaluate.split='val': its input 'data' (stage preprocess) has "
                             "split train")),
    # The data contract (issue 14): the model takes the shapes preprocess makes.
    ("train.model.image.image_size=128", ("train.model.image.image_size is 128 but "
                                          "preprocess.image_size is 64")),
    ("train.model.audio.sample_rate=16000", ("train.model.audio.sample_rate is 16000 but "
                                             "preprocess.sample_rate is 8000")),
    ("train.model.text.max_len=32", "train.model.text.max_len is 32 but preprocess.text_max_len"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_at_plan_time(override, message, tmp_path, capsys):
    code = main(["run", "workflows/demo.yaml", "--dry-run", "--data-root",
                 str(tmp_path / "data"), override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(own_stderr_lines(err.strip())) == 1, err  # one line, no traceback
    assert not (tmp_path / "data").exists()  # nothing ran, nothing was written


def test_missing_workflow_file_is_one_line(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nosuch.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "nosuch.yaml: cannot read it (No such file or directory)" in err
    assert len(own_stderr_lines(err.strip())) == 1, err


def test_unwritable_data_root_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    root = tmp_path / "a-file" / "data"
    code = main(["run", "workflows/demo.yaml", "--data-root", str(root), "--only", "synth"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"data_root {root}: cannot write there (Not a directory)" in err
    assert len(own_stderr_lines(err.strip())) == 1, err


def test_scaling_request_larger_than_the_cluster_fails_before_any_stage(ray_local, tmp_path,
                                                                       capsys):
    # ray_local has 4 CPUs; before the check, Ray Train retried starting 64 workers for ever.
    root = tmp_path / "data"
    code = main(["run", "workflows/demo.yaml", "--data-root", str(root), "--no-progress",
                 "train.num_workers=64"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "stage train needs 64 CPU but this Ray cluster has 4" in captured.err
    assert "[synth]" not in captured.out  # nothing ran first
    assert not (root / "synth").exists()


def test_dead_submit_address_is_one_line(capsys):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code = main(["submit", "workflows/demo.yaml", "--address", address])
    err = capsys.readouterr().err
    assert code == 2, err
    last = own_stderr_lines(err.strip())[-1]  # after submit's own notes: one line, no traceback
    assert last.startswith(f"mmvq: config error: --address {address}: no Ray dashboard "
                           "answers there"), err
    assert "Traceback" not in err


def test_model_shapes_follow_preprocess_when_unset(tmp_path):
    """Set only on preprocess, a shape reaches the model's config (and so its fingerprint)."""
    from workflows.plan import load_workflow, plan_workflow

    workflow = load_workflow("workflows/demo.yaml", [f"data_root={tmp_path / 'data'}",
                                                     "preprocess.image_size=32",
                                                     "preprocess.audio_samples=16000"])
    train = {p.name: p for p in plan_workflow(workflow)}["train"].config
    assert train.model.image.image_size == 32
    assert train.model.audio.num_samples == 16000
    assert train.model.audio.sample_rate == 8000  # as preprocess, which the demo sets
