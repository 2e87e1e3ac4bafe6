"""The ``mmvq`` command: run a workflow, run one stage, generate demo data.

    mmvq run workflows/demo.yaml [train.steps=100 ...] [--only|--from|--force STAGE] [--dry-run]
    mmvq status workflows/demo.yaml
    mmvq submit workflows/base.yaml --address http://HEAD:8265 --data-root /shared/mmvq
    mmvq stage train --config train.yaml --input data=runs/demo/preprocess/<fp> [steps=50 ...]
    mmvq synth --out data/shards --num-samples 256
    mmvq ingest photos/ --out data/shards
    mmvq quarantine workflows/own-data.yaml
    mmvq encode photos/ --model runs/demo/train/<fp> --out tokens.json
    mmvq decode tokens.json --model models:/mmvq-tokenizer/1 --out decoded/

Every parser is defined here and every handler is imported only when its command runs
(``"module:function"``), so ``mmvq --help`` and ``mmvq CMD --help`` load no torch, Ray or
MLflow and answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path

from pipeline.config import ConfigError, apply_overrides, load_yaml

# What ``mmvq stage --help`` lists; a test checks it against workflows.stages.STAGES, which
# cannot be imported here (it loads every stage's dependencies).
STAGE_HELP = {
    "synth": "generate the demo's spoken-scenes shards (no inputs)",
    "ingest": "a folder, CSV/JSONL manifest or shards -> validated shards (no inputs; "
              "source=PATH)",
    "preprocess": "shards -> model-ready parquet per split (--input shards=DIR: an ingest or "
                  "synth output, or any folder / s3:// prefix of webdataset .tar shards)",
    "train": "DDP training of the tokenizer (--input data=PREPROCESS_OUTPUT)",
    "tokenize": "the token dataset (--input data=PREPROCESS_OUTPUT --input model=TRAIN_OUTPUT)",
    "evaluate": "reconstruction and token metrics, trained vs untrained (--input data=... "
                "--input model=... --input tokens=TOKENIZE_OUTPUT)",
    "register": "register the tokenizer in MLflow (--input model=TRAIN_OUTPUT --input "
                "evaluation=EVALUATE_OUTPUT)",
}


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
    handler = args.handler
    if isinstance(handler, str):  # "module:function", imported only now
        module, _, function = handler.partition(":")
        handler = getattr(importlib.import_module(module), function)
    try:
        return handler(args)
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
    _add_output_flags(run)
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
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="also leave out files matching this gitignore-style pattern, "
                        "relative to the repository (repeatable). Always left out: .gitignore'd "
                        "files, build outputs and secrets (.env*, *.pem, *.key, basic_auth.ini, "
                        "*.db, .mlflow*, .aws/ and other credential files, any file holding a "
                        "PEM private key, links out of the repository)")
    submit.set_defaults(handler=_cmd_submit)

    stage = sub.add_parser(
        "stage", help="run one stage on given inputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a single stage with a config file and explicit input directories; "
        "the output is committed under DATA_ROOT/STAGE/FINGERPRINT and reused by a rerun "
        "with the same config, inputs and code.\n\nstages:\n"
        + "\n".join(f"  {name:<11} {text}" for name, text in STAGE_HELP.items()),
        epilog="examples:\n"
        "  mmvq stage ingest source=photos/ --data-root runs/mine\n"
        "  mmvq stage preprocess --input shards=data/shards image_size=128 --num-cpus 4\n"
        "  mmvq stage train --workflow workflows/own-data.yaml --input data=runs/mine/"
        "preprocess/<fp>")
    stage.add_argument("name", metavar="STAGE", help="one of: " + ", ".join(STAGE_HELP))
    stage.add_argument("--config", type=Path, help="YAML with the stage's config keys")
    stage.add_argument("--workflow", type=Path,
                       help="take the stage's config and the Ray settings from this workflow's "
                       "entry of the same name (--config and overrides apply on top)")
    stage.add_argument("--input", action="append", default=[], metavar="SLOT=DIR",
                       help="an input slot and the committed output it reads, repeatable; "
                       "shards= also takes any folder or s3:// prefix of .tar shards")
    stage.add_argument("--data-root", help="where the output is committed (default: the "
                       "workflow's data_root with --workflow, else runs/stages)")
    stage.add_argument("--num-cpus", type=int,
                       help="logical CPUs for in-process Ray (default: the workflow's "
                       "ray.num_cpus, else the machine's)")
    _add_output_flags(stage)
    stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    stage.set_defaults(handler=_cmd_stage)

    quarantine = sub.add_parser(
        "quarantine", help="every rejected sample of a workflow, by original file",
        description="One table of the samples that did not become output, across every stage "
        "of the workflow's current outputs: the stage, the user's original file (or manifest "
        "row), the key and the reason, with in = out + quarantined checked along the chain. "
        "Starts nothing.")
    quarantine.add_argument("workflow", type=Path, help="workflow YAML")
    quarantine.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE",
                            help="the overrides the run got")
    quarantine.add_argument("--data-root", help="default: the workflow's data_root")
    quarantine.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    quarantine.add_argument("--limit", type=int, default=50,
                            help="rows to print (default: %(default)s; 0: all)")
    quarantine.set_defaults(handler=_cmd_quarantine)

    synth = sub.add_parser("synth", help="generate the 'spoken scenes' demo shards",
                           description="Write webdataset shards of synthetic aligned "
                           "image / speech / caption samples with a train/val split.")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--num-samples", type=int, default=768)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(handler=_cmd_synth)

    _add_codec_commands(sub)
    _add_ingest_command(sub)
    return parser


def _add_codec_commands(sub: argparse._SubParsersAction) -> None:
    """``encode`` and ``decode`` (run by :mod:`pipeline.file_tokens`)."""
    model_help = ("the tokenizer: a directory with config.json + model.safetensors, a train "
                  "stage output (runs/demo/train/<fp>), or models:/NAME/VERSION from the MLflow "
                  "registry")
    uri_help = ("MLflow tracking server (also the registry) for models:/: the version lookup "
                "and the download both use it (default: MLFLOW_TRACKING_URI)")
    skip_help = ("exit 0 even if some %s were bad (each is still reported on stderr with its "
                 "file and reason; without this flag the exit code is 1)")
    enc = sub.add_parser(
        "encode", help="images / audio / text files -> tokens (JSON or parquet)",
        description="Encode a file or a folder of files into tokens. Files sharing a stem "
        "(cat.png, cat.wav, cat.txt, cat.json) form one sample; each is prepared exactly as "
        "the preprocess stage prepares training data (center crop, resample, fixed length). "
        "cat.json's \"split\" is the row's split (default: train). A sample that cannot be "
        "read or decoded is reported on stderr with its file and reason and left out; the "
        "others are written, and the exit code is 1 (0 with --skip-bad).",
        epilog="example: mmvq encode photos/ --model runs/demo/train/<fp> --out tokens.json")
    enc.add_argument("inputs", nargs="+", type=Path, help="files or folders; images (.png .jpg "
                     ".jpeg .webp), audio (.wav .flac .ogg .mp3), text (.txt, UTF-8), metadata "
                     "(.json: split)")
    enc.add_argument("--model", required=True, help=model_help)
    enc.add_argument("--out", type=Path, required=True,
                     help="output file: .json (readable) or .parquet (token dataset schema)")
    enc.add_argument("--tracking-uri", help=uri_help)
    enc.add_argument("--batch-size", type=int, default=32, help="samples per encode call "
                     "(default: %(default)s)")
    enc.add_argument("--skip-bad", action="store_true", help=skip_help % "samples")
    enc.add_argument("--text-tokens", choices=["ids", "codes"], default="ids",
                     help="text tokens: the caption's ids in a text vocabulary, whole and exact "
                     "(default), or the text codec's VQ codes (lossy)")
    enc.add_argument("--text-vocab", type=Path, metavar="FILE",
                     help="vocabulary of the text ids: a Hugging Face tokenizer.json (tokens "
                     "that match your language model's) or an mmvq BPE text_vocab.json "
                     "(default: the tokenizer's own, UTF-8 bytes in the demo)")
    enc.set_defaults(handler="pipeline.file_tokens:cmd_encode")

    dec = sub.add_parser(
        "decode", help="tokens -> files (PNG, WAV, TXT)",
        description="Decode tokens written by `mmvq encode` (.json/.parquet) or by the tokenize "
        "stage (a token dataset directory) back into KEY.png, KEY.wav and KEY.txt. A row "
        "that cannot be decoded is reported on stderr and left out; the others are written, "
        "and the exit code is 1 (0 with --skip-bad).",
        epilog="example: mmvq decode runs/demo/tokenize/<fp> --split val --limit 8 "
        "--model runs/demo/train/<fp> --out decoded/")
    dec.add_argument("tokens", type=Path, help="an encode output (.json, .parquet) or a token "
                     "dataset (tokenize output, its tokens/ or a split directory)")
    dec.add_argument("--model", required=True, help=model_help)
    dec.add_argument("--out", type=Path, required=True, help="output folder")
    dec.add_argument("--split", help="token dataset split to decode (default: all)")
    dec.add_argument("--limit", type=int, help="decode only the first N samples")
    dec.add_argument("--tracking-uri", help=uri_help)
    dec.add_argument("--batch-size", type=int, default=32, help="samples per decode call "
                     "(default: %(default)s)")
    dec.add_argument("--skip-bad", action="store_true", help=skip_help % "rows")
    dec.add_argument("--text-vocab", type=Path, metavar="FILE",
                     help="the text vocabulary file the tokens were encoded with, when it is not "
                     "the tokenizer's own (the tokens record its sha256, which must match)")
    dec.set_defaults(handler="pipeline.file_tokens:cmd_decode")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """``"256MB"``, ``"1GiB"``, ``"1000"`` -> bytes."""
    match = _SIZE.match(text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 1GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def _add_ingest_command(sub: argparse._SubParsersAction) -> None:
    """``ingest`` (run by :mod:`pipeline.ingest`)."""
    parser = sub.add_parser(
        "ingest", help="turn a folder, CSV/JSONL manifest or existing shards into validated "
        "webdataset shards", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_INGEST_DESCRIPTION, epilog=_INGEST_EXAMPLES)
    parser.add_argument("source", help="folder, .csv/.jsonl manifest, a .tar shard or folder of "
                        ".tar shards: a path or URI (s3://bucket/prefix, file:///...)")
    parser.add_argument("--out", required=True, help="output directory, path or URI; a rerun "
                        "into the same place resumes, keeping finished shards")
    parser.add_argument("--format", default="auto",
                        choices=["auto", "folder", "csv", "jsonl", "shards"],
                        help="how to read SOURCE (default: by suffix / by content)")
    parser.add_argument("--max-samples", type=int, default=1000,
                        help="samples per shard at most (default: %(default)s)")
    parser.add_argument("--max-bytes", type=parse_size, default="256MiB",
                        help="bytes per shard at most, e.g. 64MB, 1GiB; 0 for no limit "
                        "(default: 256MiB)")
    parser.add_argument("--default-split", default="train",
                        help="split of samples that name none (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="of the samples that name no split, this fraction goes to val, "
                        "chosen by a hash of the key (default: %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first sample that would be quarantined, naming its "
                        "source, key and reason")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an OUT that holds another source's shards (which are "
                        "deleted) or files that are not ingest output; without it such an OUT "
                        "is refused (rerunning the same source resumes without it)")
    parser.add_argument("--allow-outside", action="store_true",
                        help="let a CSV/JSONL manifest name files outside its own folder "
                        "(absolute paths, '..', links leading out); without it each such row "
                        "is quarantined naming the path")
    parser.add_argument("--max-member-bytes", type=parse_size, default="256MiB",
                        help="a file (or inline text, or shard member) larger than this is "
                        "quarantined with its size, never read (default: 256MiB)")
    parser.set_defaults(handler="pipeline.ingest:cmd_ingest")


_INGEST_DESCRIPTION = """\
Three sources, one output. A folder of files sharing a stem (a.jpg, a.flac, a.txt, a.json; the
key is the path without the extension), a CSV/JSONL manifest (one row per sample), or existing
webdataset shards written by any tool. The output is OUT/SPLIT/shard-NNNNNN.tar with every key's
members contiguous and every key unique, quarantine.parquet for what could not be taken (with
the original file), and manifest.json (shards with sample count, bytes and sha256; counts per
split and modality; in = out + quarantined). The output folder is what preprocess reads:
  mmvq stage preprocess --input shards=OUT"""

_INGEST_EXAMPLES = """\
manifest columns (CSV header or JSONL keys): key (required), image, audio (file paths, relative
to the manifest), text (inline) or text_path, split; any other column goes into the sample's
json metadata. Paths must resolve (links included) inside the manifest's folder unless
--allow-outside. A folder source's links are never followed: each is quarantined.

examples:
  mmvq ingest data/pairs --out runs/shards                     # a.jpg a.flac a.txt a.json ...
  mmvq ingest data/index.csv --out s3://bucket/shards --max-bytes 512MB
  mmvq ingest old_shards/ --format shards --out fixed/ --max-samples 5000

AWS_ENDPOINT_URL_S3 (or ?endpoint_override=URL on the URI) points s3:// at an S3-compatible
store; credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile."""


def _progress(args: argparse.Namespace) -> bool:
    """Bars on a terminal or with --verbose; never with --no-progress (logs stay readable)."""
    return not args.no_progress and (args.verbose or sys.stderr.isatty())


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray Data's per-operator progress and Ray's own log lines too "
                        "(default: only on a terminal, and only the stage's own bars)")


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="run just this stage on committed upstream outputs (repeatable)")
    parser.add_argument("--from", dest="from_", action="append", default=[], metavar="STAGE",
                        help="rerun this stage and everything downstream of it (repeatable)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun this stage even if its output exists (repeatable)")


def _load_workflow(args: argparse.Namespace):
    from workflows.plan import load_workflow

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    return load_workflow(args.workflow, overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from workflows.plan import format_plan, plan_workflow
    from workflows.report import format_report
    from workflows.run import run_workflow
    from workflows.spec import workflow_tracking_uri

    workflow = _load_workflow(args)
    flags = {"only": args.only, "from_": args.from_, "force": args.force}
    if args.dry_run:
        print(format_plan(plan_workflow(workflow, **flags)))
        return 0
    results = run_workflow(workflow, progress=_progress(args), verbose=args.verbose,
                           workflow_file=args.workflow, **flags)
    print(format_report(results, workflow_tracking_uri(workflow)))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from workflows.plan import format_status, plan_workflow

    workflow = _load_workflow(args)
    print(format_status(workflow, plan_workflow(workflow)))
    return 0


def _cmd_quarantine(args: argparse.Namespace) -> int:
    """Exit 0 when the counts add up along the chain, else 1."""
    import csv

    from workflows.accounting import (
        COLUMNS,
        chain_counts,
        format_quarantine,
        rejected_samples,
    )
    from workflows.plan import plan_workflow

    plan = plan_workflow(_load_workflow(args))
    rejected = rejected_samples(plan)
    chain = chain_counts(plan)
    print(format_quarantine(rejected, chain, args.limit))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rejected.to_pylist())
        print(f"wrote {rejected.num_rows} rows to {args.csv}")
    return 0 if all(line.consistent for line in chain) else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    from workflows.submit import submit_workflow

    return submit_workflow(
        args.workflow, args.overrides, address=args.address, data_root=args.data_root,
        only=args.only, from_=args.from_, force=args.force, wait=not args.no_wait,
        python=args.python, submission_id=args.submission_id, exclude=args.exclude)


def _cmd_stage(args: argparse.Namespace) -> int:
    from workflows.plan import load_workflow
    from workflows.report import format_report
    from workflows.run import run_single_stage
    from workflows.spec import RayConfig

    data: dict = {}
    ray = RayConfig()
    data_root = args.data_root
    if args.workflow:
        workflow = load_workflow(args.workflow)
        entry = workflow.stages.get(args.name) or next(
            (e for e in workflow.stages.values() if e.stage == args.name), None)
        if entry is None:
            raise ConfigError(f"{args.workflow} has no stage {args.name!r} "
                              f"(stages: {', '.join(workflow.stages)})")
        data, ray, data_root = dict(entry.config), workflow.ray, data_root or workflow.data_root
    if args.config:
        data = {**data, **load_yaml(args.config)}
    data = apply_overrides(data, args.overrides)
    if args.num_cpus is not None:
        ray = dataclasses.replace(ray, num_cpus=args.num_cpus)
    inputs = {}
    for item in args.input:
        slot, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--input {item!r} is not of the form SLOT=DIR")
        inputs[slot] = path
    result = run_single_stage(args.name, data, inputs, data_root=Path(data_root or "runs/stages"),
                              source=str(args.config or args.workflow or "overrides"), ray=ray,
                              progress=_progress(args), verbose=args.verbose)
    print(format_report([result], result.tracking_uri))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth_run

    manifest = synth_run(SynthConfig(num_samples=args.num_samples, seed=args.seed,
                                     image_size=args.image_size), args.out,
                         progress=sys.stderr.isatty())
    print(f"wrote {manifest.get('counts')} samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
