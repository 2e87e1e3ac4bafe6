"""The ``mmvq`` command: run a workflow, run one stage, generate demo data.

    mmvq run workflows/demo.yaml [train.steps=100 ...] [--only|--from|--force STAGE] [--dry-run]
    mmvq status workflows/demo.yaml
    mmvq submit workflows/base.yaml --address http://HEAD:8265 --data-root /shared/mmvq
    mmvq stage train --config train.yaml --input data=runs/demo/preprocess/<fp> [steps=50 ...]
    mmvq synth --out data/shards --num-samples 256
    mmvq encode photos/ --model runs/demo/train/<fp> --out tokens.json
    mmvq decode tokens.json --model models:/mmvq-tokenizer/1 --out decoded/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, apply_overrides, load_yaml


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after the options; argparse alone would reject the latter.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"mmvq: config error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmvq", description="Train multimodal VQ tokenizers on Ray and turn aligned "
        "image/audio/text into token datasets, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a workflow (reusing stages whose inputs, config and "
                         "code are unchanged)",
                         description="Run the stages of a workflow file in order under one "
                         "MLflow parent run.")
    run.add_argument("workflow", type=Path, help="workflow YAML, e.g. workflows/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                     help="config overrides, e.g. train.steps=100 or data_root=/tmp/x")
    run.add_argument("--data-root", help="where stage outputs and the SQLite MLflow store go "
                     "(default: the workflow's data_root)")
    _add_plan_flags(run)
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan (run or reuse per stage, and why) and stop")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=_cmd_run)

    status = sub.add_parser("status", help="table of a workflow's stages: done, missing, stale",
                            description="For each stage: done (committed for its current "
                            "fingerprint), running, stale (committed only for an older "
                            "config/code/input) or missing, with the fingerprint, the MLflow "
                            "run that produced it and the output directory. Starts nothing.")
    status.add_argument("workflow", type=Path, help="workflow YAML")
    status.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                        help="the overrides the run would get")
    status.add_argument("--data-root", help="default: the workflow's data_root")
    status.set_defaults(handler=_cmd_status)

    submit = sub.add_parser("submit", help="submit a workflow to a Ray cluster as a Ray job",
                            description="Submit `mmvq run WORKFLOW` as a Ray job (the "
                            "repository is the job's working_dir), stream its logs and exit "
                            "with the job's status.")
    submit.add_argument("workflow", type=Path, help="workflow YAML inside this repository")
    submit.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                        help="config overrides, passed to the job")
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 "
                        "(default: $RAY_ADDRESS)")
    submit.add_argument("--data-root", help="where the job commits outputs: a path every node "
                        "mounts (default: the workflow's data_root, relative to the job's "
                        "working directory)")
    _add_plan_flags(submit)
    submit.add_argument("--no-wait", action="store_true",
                        help="print the job id and return without following the logs")
    submit.add_argument("--python", default="python",
                        help="the cluster's Python interpreter (default: %(default)s)")
    submit.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    submit.set_defaults(handler=_cmd_submit)

    stage = sub.add_parser("stage", help="run one stage on given inputs",
                           description="Run a single stage with a config file and explicit "
                           "input directories; the output is committed under "
                           "DATA_ROOT/STAGE/FINGERPRINT.")
    stage.add_argument("name", help="stage name: synth, preprocess, train, tokenize, evaluate, "
                       "register")
    stage.add_argument("--config", type=Path, help="YAML with the stage's config keys")
    stage.add_argument("--input", action="append", default=[], metavar="SLOT=DIR",
                       help="an input slot and the committed output it reads, repeatable")
    stage.add_argument("--data-root", default="runs/stages", help="default: %(default)s")
    stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    stage.set_defaults(handler=_cmd_stage)

    synth = sub.add_parser("synth", help="generate the 'spoken scenes' demo shards",
                           description="Write webdataset shards of synthetic aligned "
                           "image / speech / caption samples with a train/val split.")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--num-samples", type=int, default=768)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(handler=_cmd_synth)

    from pipeline.codec import add_commands

    add_commands(sub)  # encode, decode
    from pipeline.ingest import add_command as add_ingest_command

    add_ingest_command(sub)  # ingest
    return parser


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run just this stage on committed upstream outputs (repeatable)")
    parser.add_argument("--from", dest="from_", action="append", default=[], metavar="STAGE",
                        help="rerun this stage and everything downstream of it (repeatable)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun this stage even if its output exists (repeatable)")


def _load_workflow(args: argparse.Namespace):
    from workflows.runner import load_workflow

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    return load_workflow(args.workflow, overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from workflows.runner import (
        format_plan,
        format_report,
        plan_workflow,
        run_workflow,
        workflow_tracking_uri,
    )

    workflow = _load_workflow(args)
    flags = {"only": args.only, "from_": args.from_, "force": args.force}
    if args.dry_run:
        print(format_plan(plan_workflow(workflow, **flags)))
        return 0
    results = run_workflow(workflow, progress=not args.no_progress,
                           workflow_file=args.workflow, **flags)
    print(format_report(results, workflow_tracking_uri(workflow)))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from workflows.runner import format_status, plan_workflow

    workflow = _load_workflow(args)
    print(format_status(workflow, plan_workflow(workflow)))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit_workflow

    return submit_workflow(
        args.workflow, args.overrides, address=args.address, data_root=args.data_root,
        only=args.only, from_=args.from_, force=args.force, wait=not args.no_wait,
        python=args.python, submission_id=args.submission_id)


def _cmd_stage(args: argparse.Namespace) -> int:
    from workflows.runner import format_report, run_single_stage

    data = load_yaml(args.config) if args.config else {}
    data = apply_overrides(data, args.overrides)
    inputs = {}
    for item in args.input:
        slot, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--input {item!r} is not of the form SLOT=DIR")
        inputs[slot] = Path(path)
    result = run_single_stage(args.name, data, inputs, data_root=Path(args.data_root),
                              source=str(args.config or "overrides"))
    print(format_report([result], result.tracking_uri))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth_run

    manifest = synth_run(SynthConfig(num_samples=args.num_samples, seed=args.seed,
                                     image_size=args.image_size), args.out)
    print(f"wrote {manifest.get('counts')} samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
