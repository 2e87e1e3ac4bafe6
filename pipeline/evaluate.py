"""Evaluate stage: reconstruction quality on the val split, trained tokenizer vs untrained.

The trained side decodes the *token dataset* that tokenize wrote, so the numbers describe the
tokens a language model will see; the untrained baseline (same architecture, same init seed as
training) encodes and decodes the same rows. Metrics, a PNG grid of originals vs
reconstructions, WAV clips and decoded captions go to the output directory and to MLflow. The
scores and their keys (``image/psnr``, ``image/codebook_usage``, ...) are those of
:class:`mmvq.scoring.ReconstructionScores`, the scorer training's validation uses too, plus the
split-level ``image/rfid`` (:mod:`mmvq.fid`) when local Inception weights are found. The
report's protocol section defines each.

The scoring runs as one Ray task with its own resources (``num_cpus``, or a GPU with
``use_gpu``), not in the driver: on a cluster the driver is a small head process, and the models
and the split's rows belong on a worker. It streams the split's parquet files batch by batch.
The task writes the output files; the driver logs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import report
from pipeline.config import ConfigError, at_least, positive
from pipeline.formats.checkpoint import TOKENIZER_DIR
from pipeline.formats.registry import METRICS_FILE, previous_version
from pipeline.formats.shards import SPLIT_NAME
from pipeline.formats.tokens import TOKENS_DIR, read_manifest
from pipeline.stage import StageContext

if TYPE_CHECKING:  # the scoring runs in a Ray task: a plan importing this stage loads no torch
    import torch

    from mmvq.scoring import ReconstructionScores
    from mmvq.text_vocab import TextVocab

# Fusion models: the probe retrieval of this model and of the newest registered separate one.
FUSED_VS_SEPARATE_FILE = "fused_vs_separate.json"
CODE_COLUMNS = {"image": "image_tokens", "audio": "audio_tokens", "text": "text_tokens",
                "joint": "joint_tokens"}  # joint: fusion models only


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "val"  # the fixed evaluation split
    batch_size: int = 64  # rows per decode call
    seed: int = 0  # init seed of the untrained baseline; the train stage's seed makes it match
    grid_samples: int = 8  # columns of the original / trained / untrained image grid
    audio_samples: int = 3  # clips written as WAV per model
    # Local LPIPS weights file (mmvq/perceptual.py says how to make one); unset: torch's hub
    # cache is looked in, as training does. Never downloaded; none: image/lpips is left out and
    # a log line says why.
    lpips_weights: str | None = None
    # torch-fidelity's Inception-v3 weights for image/rfid (mmvq/fid.py); unset: torch's hub
    # cache (checkpoints/weights-inception-2015-12-05-6726825d.pth). Never downloaded; none:
    # image/rfid is left out and a log line says why.
    inception_weights: str | None = None
    # Registered model whose newest version the report compares with (its eval/* tags);
    # None: no comparison. The register stage registers under the same name. A model trained
    # with fusion is also scored beside the newest version trained without it, on this split
    # and through the same retrieval probe (FUSED_VS_SEPARATE_FILE, the report's "Fused vs
    # separate" section).
    compare_with: str | None = "mmvq-tokenizer"
    # The split the retrieval probe of the fused-vs-separate comparison is fitted on (fusion
    # models only; the probe is scored on ``split``).
    probe_split: str = "train"
    num_cpus: float = 1.0  # the scoring task's CPUs (torch threads follow them)
    use_gpu: bool = False  # score on one GPU

    def min_resources(self) -> dict[str, float]:
        return {"GPU": 1.0} if self.use_gpu else {"CPU": self.num_cpus}

    def __post_init__(self) -> None:
        at_least("evaluate", self, 1, "batch_size")
        at_least("evaluate", self, 0, "grid_samples", "audio_samples", "seed")
        positive("evaluate", self, "num_cpus")
        for key in ("split", "probe_split"):
            if not SPLIT_NAME.fullmatch(getattr(self, key)):
                raise ConfigError(f"evaluate.{key} {getattr(self, key)!r} is not a split name "
                                  "(letters, digits, '-', '_')")

    def required_splits(self) -> dict[str, str]:
        """Input slot -> the split this stage reads from it (checked when planning)."""
        return {"data": self.split}


def run(config: EvaluateConfig, ctx: StageContext) -> dict[str, Any]:
    """Score trained (from the token dataset) and untrained reconstructions on ``split``."""
    import ray

    task = ray.remote(score).options(num_cpus=0 if config.use_gpu else config.num_cpus,
                                     num_gpus=1 if config.use_gpu else 0, max_retries=0)
    results = ray.get(task.remote(
        config, Path(ctx.inputs["data"]) / config.split,
        Path(ctx.inputs["model"]) / TOKENIZER_DIR,
        Path(ctx.inputs["tokens"]) / TOKENS_DIR / config.split, ctx.output_dir,
        ctx.tracking_uri))
    out_dir = ctx.output_dir
    print(baseline_line(results["trained"]), flush=True)
    if ctx.logger:
        flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
        ctx.logger.metrics(flat, step=0)
        for artifact in (METRICS_FILE, FUSED_VS_SEPARATE_FILE, "reconstructions.png",
                         "captions.json",
                         report.USAGE_PNG, report.SPECTROGRAM_PNG, report.REPORT):
            if (out_dir / artifact).is_file():
                ctx.logger.artifact(out_dir / artifact)
        ctx.logger.artifacts(out_dir / "audio", "audio")
    return results


def baseline_line(trained: dict[str, float]) -> str:
    """The trained model's image PSNR beside that of a flat image of each sample's mean colour,
    in one line: a tokenizer used out of its training domain can score below it."""
    ours, flat = trained.get("image/psnr"), trained.get("image/psnr_flat")
    if ours is None or flat is None:
        return "[evaluate] no images scored"
    verdict = ("above" if ours > flat else
               "NOT above: on these images the tokenizer is worse than no tokenizer; train it "
               "on data like them (README: Bring your own data)")
    return (f"[evaluate] image PSNR {ours:.2f} dB, flat mean-colour baseline {flat:.2f} dB: "
            f"{verdict}")


def score(config: EvaluateConfig, data_dir: Path, model_dir: Path, tokens_dir: Path,
          out_dir: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Metrics of the trained and untrained models on one split; writes the output files.

    Parameters
    ----------
    data_dir : the preprocessed split (parquet files).
    model_dir : the trained tokenizer directory.
    tokens_dir : the token dataset's split directory (its codes are what is decoded).
    out_dir : where metrics.json, the image grid, WAV clips, captions and the report go.
    tracking_uri : for the comparison with the newest registered version (None: none).
    """
    import torch

    from mmvq.batch import to_model_inputs
    from mmvq.scoring import ReconstructionScores
    from mmvq.tokenizer import MultimodalTokenizer

    device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
    trained = MultimodalTokenizer.load(model_dir, map_location=device).eval()
    torch.manual_seed(config.seed)
    untrained = MultimodalTokenizer(trained.config, text_vocab=trained.text_vocab).eval()
    untrained.to(device)
    tokens = _read_tokens(tokens_dir)
    # Text tokens that are the caption's ids (the default) say nothing of the text codec; its
    # own codes are scored instead, so the text metrics still measure the codec.
    text_ids = read_manifest(tokens_dir)["vocabulary"].get("text_tokens", {}).get("kind") == "ids"

    models = {"trained": trained, "untrained": untrained}
    separate, note = (_separate_model(config, trained, tracking_uri, device)
                      if trained.fusion is not None else (None, None))
    if separate is not None:
        models["separate"] = separate["model"]
    lpips = _load_lpips(config.lpips_weights)
    rfid = _load_rfid(config.inception_weights, device, tuple(models))
    rate = trained.config.audio.sample_rate
    scores = {name: ReconstructionScores(model.codebook_sizes(), rate, lpips, speech=True)
              for name, model in models.items()}
    examples: dict[str, dict[str, Any]] = {}
    for batch in _batches(data_dir, config.batch_size):
        inputs = to_model_inputs(batch, device)
        # Trained: the token dataset's codes, as a language model will see them.
        trained_codes = {k: v.to(device) for k, v in
                         _codes_for(batch["key"], tokens, trained, text_ids).items()}
        if text_ids:
            with torch.no_grad():
                trained_codes["text"] = trained.encode(inputs)["text"]
        # Residual audio: the baseline gets as many levels as the token dataset holds.
        levels = trained_codes["audio"].shape[2] if trained_codes["audio"].ndim == 3 else None
        with torch.no_grad():
            codes = {"trained": trained_codes,
                     "untrained": untrained.encode(inputs, audio_levels=levels)}
            if "separate" in models:  # all its levels: it is scored as it was trained
                codes["separate"] = models["separate"].encode(inputs)
            outputs = {name: models[name].decode(codes[name]) for name in models}
            for name, model in models.items():
                embeddings = model.embed(inputs) if model.fusion is not None else {}
                scores[name].add(inputs, outputs[name], codes[name], embeddings)
                if codes[name]["audio"].ndim == 3:  # residual levels
                    scores[name].add_bitrates(inputs, model, codes[name]["audio"])
            if rfid is not None:  # the originals' features once, for both models
                img = inputs.has_image
                rfid.add(inputs.image[img], {name: out["image"][img].float()
                                             for name, out in outputs.items()})
        if not examples:
            examples = {"inputs": inputs, **outputs}

    results = {name: s.summary() for name, s in scores.items()}
    for name, distance in (rfid.distances() if rfid is not None else {}).items():
        results[name]["image/rfid"] = distance
    (out_dir / METRICS_FILE).write_text(json.dumps(results, indent=2))
    comparison = None
    if trained.fusion is not None:
        comparison = _fused_vs_separate(config, data_dir, trained, separate, note)
        (out_dir / FUSED_VS_SEPARATE_FILE).write_text(json.dumps(comparison, indent=2))
    _write_image_grid(examples, config.grid_samples, out_dir / "reconstructions.png")
    _write_audio(examples, config.audio_samples, trained.config.audio.sample_rate,
                 out_dir / "audio")
    _write_text(examples, out_dir / "captions.json", trained.text_vocab)
    _write_report(config, out_dir, tracking_uri, trained, scores["trained"], results, text_ids,
                  comparison)
    return results


def _separate_model(config: EvaluateConfig, fused: Any, tracking_uri: str | None,
                    device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """The newest registered version of ``compare_with`` trained without fusion, loaded, when
    it takes the same inputs as the fused model; else None and the reason, in a sentence."""
    from mmvq.tokenizer import MultimodalTokenizer
    from pipeline.file_tokens import resolve_model

    if not config.compare_with or not tracking_uri:
        return None, "no registered model to compare with (evaluate.compare_with unset)"
    found = previous_version(tracking_uri, config.compare_with, fused=False)
    if found is None:
        return None, (f"no version of {config.compare_with!r} trained without fusion is "
                      "registered, so only the fused model's own heads are scored here (the "
                      "probe compares two models through one head): run the workflow once "
                      "with train.model.fusion.enabled=false (its register stage registers "
                      "one) and this stage again, or run make bench-fusion")
    spec = f"models:/{config.compare_with}/{found['version']}"
    try:
        model = MultimodalTokenizer.load(resolve_model(spec, tracking_uri), map_location=device)
    except (ValueError, OSError) as err:
        return None, f"{spec} could not be loaded: {err}"
    ours, theirs = fused.config, model.config
    inputs = {"image size": (ours.image.image_size, theirs.image.image_size),
              "audio rate": (ours.audio.sample_rate, theirs.audio.sample_rate),
              "audio samples": (ours.audio.num_samples, theirs.audio.num_samples),
              "text length": (ours.text.max_len, theirs.text.max_len),
              "text vocabulary": (fused.text_vocab.sha256 or fused.text_vocab.kind,
                                  model.text_vocab.sha256 or model.text_vocab.kind)}
    differ = [f"{k} {a} here, {b} there" for k, (a, b) in inputs.items() if a != b]
    if differ:
        return None, f"{spec} was trained for other inputs ({'; '.join(differ)})"
    print(f"[evaluate] fusion: comparing with the separately trained {spec}", flush=True)
    return {"model": model.eval(), "name": config.compare_with,
            "version": found["version"]}, None


def _fused_vs_separate(config: EvaluateConfig, data_dir: Path, fused: Any,
                       separate: dict[str, Any] | None, note: str | None) -> dict[str, Any]:
    """Probe retrieval of the fused model and of the separate one, fitted on ``probe_split``
    and scored on the evaluated split (:mod:`pipeline.probe_retrieval`).

    Without a separate model only the fused heads' retrieval is scored: the probe exists to
    compare two models through the same head, and fitting it costs more than the rest of the
    stage (~2 min on one CPU for the demo, which made fusion's demo 1.7x the time without it).
    """
    from pipeline.probe_retrieval import score_model

    fit_dir = data_dir.parent / config.probe_split
    result: dict[str, Any] = {"split": config.split, "probe_split": config.probe_split,
                              "separate": None, "note": note}
    if separate is None:
        result["fused"] = score_model(fused, None, data_dir)
        return result
    if not any(fit_dir.glob("*.parquet")):
        result["note"] = (f"no probe retrieval: the data has no {config.probe_split!r} split "
                          f"to fit the probe on ({fit_dir})")
        result["fused"] = score_model(fused, None, data_dir)
        return result
    result["fused"] = score_model(fused, fit_dir, data_dir)
    result["separate"] = {"name": separate["name"], "version": separate["version"],
                          **score_model(separate["model"], fit_dir, data_dir)}
    return result


def _batches(directory: Path, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The split's rows as numpy batches, one parquet file at a time (bounded memory)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor  # Ray's tensor columns -> numpy arrays

    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {directory} (is the split name right?)")
    for path in files:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([record_batch])
            yield BlockAccessor.for_block(table).to_batch_format("numpy")


def _load_lpips(path: str | None) -> torch.nn.Module | None:
    """The configured LPIPS file, else the hub cache's (as training finds it); None (said in a
    line) without one."""
    from mmvq.perceptual import build_perceptual, load_lpips, where_lpips_is_looked_for

    if path is not None and Path(path).is_file():
        return load_lpips(path)
    net = build_perceptual(None, announce=False) if path is None else None
    if net is None:
        # A line in the run's output, like the runner's own: the metric is missing on purpose.
        print("[evaluate] image/lpips skipped: " + (
            f"evaluate.lpips_weights is not set and there is no {where_lpips_is_looked_for()}"
            if path is None else f"no LPIPS weights file at {path}"), flush=True)
    return net


def _load_rfid(path: str | None, device: torch.device, models: tuple[str, ...]) -> Any:
    """A :class:`mmvq.fid.ReconstructionFID` over the local Inception weights; None (said in a
    line) without them."""
    from mmvq.fid import ReconstructionFID, find_inception_weights, load_inception

    found, reason = find_inception_weights(path)
    if found is None:
        print(f"[evaluate] image/rfid skipped: {reason}", flush=True)
        return None
    return ReconstructionFID(load_inception(found).to(device), models)


def _write_report(config: EvaluateConfig, out_dir: Path, tracking_uri: str | None, model: Any,
                  scores: ReconstructionScores, results: dict[str, Any],
                  text_ids: bool = False, comparison: dict[str, Any] | None = None) -> None:
    """Usage histograms, the comparison with the last registered version, report.html."""

    report.plot_usage(scores.code_counts(), out_dir / report.USAGE_PNG)  # trained model
    previous = (previous_version(tracking_uri, config.compare_with)
                if config.compare_with and tracking_uri else None)
    if previous:
        (out_dir / "previous.json").write_text(json.dumps(previous, indent=2))
    cfg = model.config
    protocol = {
        "split": f"{config.split} ({int(results['trained']['samples'])} samples)",
        "image": f"{cfg.image.image_size}x{cfg.image.image_size} center crop (preprocess)",
        "audio": f"{cfg.audio.num_samples / cfg.audio.sample_rate:.2f} s at "
                 f"{cfg.audio.sample_rate} Hz, cropped or zero-padded (preprocess)",
        "trained": "decoded from the token dataset", "untrained": f"same architecture, "
                                                                   f"seed {config.seed}",
        "image/lpips": "LPIPS distance (VGG16, Zhang et al. 2018), per-sample mean; lower "
                       "is better" if scores.lpips is not None else
                       "off (no local LPIPS weights)",
        "image/rfid": f"Fréchet Inception distance of the reconstructions to the originals "
                      f"(torch-fidelity's Inception-v3 pool3, 2048-d, uint8 pixels resized to "
                      f"299; Heusel et al. 2017) over the split's "
                      f"{int(results['trained']['samples'])} images; lower is better, and at "
                      f"this few images biased upward: compare runs on the same split"
                      if "image/rfid" in results["trained"] else
                      "off (no local Inception weights)",
        "image/psnr": "peak signal-to-noise ratio in dB over pixels in [-1, 1] (range 2), "
                      "per-sample mean; higher is better",
        "image/ssim": "structural similarity (Wang et al. 2004; 11x11 Gaussian window, "
                      "sigma 1.5), per-sample mean, -1..1",
        "audio/si_snr": "scale-invariant SNR in dB (Le Roux et al. 2019) over each clip's real "
                        "length",
        "audio/mel_distance": "L1 distance of log-mel spectrograms at STFT sizes 128 and 512 "
                              "(mean of the two); lower is better",
        "codebook_usage": "fraction of a codebook's codes used at least once on the split; "
                          "perplexity: exp of the code distribution's entropy (K at uniform "
                          "use)",
        "image/psnr_flat": "PSNR of a flat image of each sample's mean colour: the baseline "
                           "to beat",
        "audio/stoi": "short-time objective intelligibility (pystoi; Taal et al. 2011), 0..1, "
                      "over each clip's real length",
        "audio/pesq": f"PESQ MOS-LQO (pesq; ITU-T P.862), "
                      f"{'narrow-band' if cfg.audio.sample_rate == 8000 else 'wide-band'}"
                      f"{'' if cfg.audio.sample_rate in (8000, 16000) else ' after resampling to 16 kHz'}"
                      ", over each clip's real length; clips without speech are left out",
        "text": "scored on the text codec's own codes" + (
            " (the token dataset's text tokens are the caption's ids, exact by construction)"
            if text_ids else "")}
    report.write_report(out_dir, results, previous, protocol, fused_vs_separate=comparison)


def _read_tokens(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    table = pq.ParquetDataset(str(directory)).read(
        columns=["key", *CODE_COLUMNS.values(), "audio_levels"])
    columns = table.to_pydict()
    return {key: {name: np.asarray(columns[name][i]) for name in columns if name != "key"}
            for i, key in enumerate(columns["key"])}


def _codes_for(keys: np.ndarray, tokens: dict[str, dict[str, np.ndarray]],
               model: Any, text_ids: bool = False) -> dict[str, torch.Tensor]:
    """The token dataset's codes for ``keys``, reshaped to the model's token grids; no text
    when its text tokens are caption ids (``text_ids``), not codes."""
    import torch

    missing = [str(k) for k in keys if str(k) not in tokens]
    if missing:
        raise KeyError(f"token dataset lacks {len(missing)} val keys, e.g. {missing[:3]}")
    shapes = model.token_shapes()
    out = {}
    for modality, column in CODE_COLUMNS.items():
        if modality not in shapes or (modality == "text" and text_ids):  # joint: fusion only
            continue
        shape = shapes[modality]
        if modality == "audio" and len(shape) == 2:
            # Residual audio: frame-major (frames, n), n = the levels tokenize kept.
            shape = (shape[0], int(tokens[str(keys[0])]["audio_levels"]))
        stacked = np.stack([tokens[str(k)][column].reshape(shape) for k in keys])
        out[modality] = torch.from_numpy(stacked.astype(np.int64))
    return out


def _write_image_grid(examples: dict[str, Any], n: int, path: Path) -> None:
    """Rows: original, trained reconstruction, untrained reconstruction; a column per sample."""
    from mmvq.modalities.image import to_uint8

    rows = [examples["inputs"].image[:n], examples["trained"]["image"][:n],
            examples["untrained"]["image"][:n]]
    report.write_image_grid([to_uint8(r) for r in rows], path, min_height=256)


def _write_audio(examples: dict[str, Any], n: int, rate: int, directory: Path) -> None:
    import soundfile

    directory.mkdir(parents=True, exist_ok=True)
    inputs = examples["inputs"]
    for i in range(min(n, len(inputs.audio))):
        length = int(inputs.audio_len[i])
        for name, wave in (("original", inputs.audio[i]),
                           ("trained", examples["trained"]["audio"][i]),
                           ("untrained", examples["untrained"]["audio"][i])):
            clip = wave[:length].clamp(-1, 1).cpu().numpy()
            soundfile.write(directory / f"sample{i}_{name}.wav", clip, rate)


def _write_text(examples: dict[str, Any], path: Path, vocab: TextVocab) -> None:
    """Original and decoded captions as strings, through the checkpoint's text vocabulary."""
    from mmvq.text_vocab import decode_ids

    inputs = examples["inputs"]
    captions = []
    for i in range(len(inputs.text_ids)):
        n = int(inputs.text_len[i])
        captions.append({name: decode_ids(ids[i].cpu().numpy(), n, vocab) for name, ids in (
            ("original", inputs.text_ids), ("trained", examples["trained"]["text_ids"]),
            ("untrained", examples["untrained"]["text_ids"]))})
    path.write_text(json.dumps(captions, indent=2))
