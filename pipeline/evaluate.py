"""Evaluate stage: reconstruction quality on the val split, trained tokenizer vs untrained.

The trained side decodes the *token dataset* that tokenize wrote, so the numbers describe the
tokens a language model will see; the untrained baseline (same architecture, same init seed as
training) encodes and decodes the same rows. Metrics, a PNG grid of originals vs
reconstructions, WAV clips and decoded captions go to the output directory and to MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import soundfile
import torch
from PIL import Image

from mmvq import metrics as M
from pipeline.stage import StageContext
from pipeline.tokenize import TOKENS_DIR
from pipeline.train import TOKENIZER_DIR

MODALITY_CODES = {"image": "image_tokens", "audio": "audio_tokens", "text": "text_tokens"}
CODE_COLUMNS = {**MODALITY_CODES, "joint": "joint_tokens"}  # joint: fusion models only


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "val"  # the fixed evaluation split
    batch_size: int = 64  # rows per decode call
    seed: int = 0  # init seed of the untrained baseline; the train stage's seed makes it match
    grid_samples: int = 8  # columns of the original / trained / untrained image grid
    audio_samples: int = 3  # clips written as WAV per model


def run(config: EvaluateConfig, ctx: StageContext) -> dict[str, Any]:
    """Score trained (from the token dataset) and untrained reconstructions on ``split``."""
    import ray.data

    from mmvq import MultimodalTokenizer, to_model_inputs

    trained = MultimodalTokenizer.load(Path(ctx.inputs["model"]) / TOKENIZER_DIR).eval()
    torch.manual_seed(config.seed)
    untrained = MultimodalTokenizer(trained.config).eval()
    tokens = _read_tokens(Path(ctx.inputs["tokens"]) / TOKENS_DIR / config.split)
    rows = ray.data.read_parquet(str(Path(ctx.inputs["data"]) / config.split))

    scores = {"trained": _Scores(trained), "untrained": _Scores(untrained)}
    examples: dict[str, dict[str, Any]] = {}
    models = {"trained": trained, "untrained": untrained}
    for batch in rows.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
        inputs = to_model_inputs(batch, "cpu")
        # Trained: the token dataset's codes, as a language model will see them.
        codes = {"trained": _codes_for(batch["key"], tokens, trained),
                 "untrained": untrained.encode(inputs)}
        outputs = {name: models[name].decode(codes[name]) for name in models}
        for name, model in models.items():
            embeddings = model.embed(inputs) if model.fusion is not None else {}
            scores[name].add(inputs, outputs[name], codes[name], embeddings)
        if not examples:
            examples = {"inputs": inputs, **outputs}

    results = {name: s.summary() for name, s in scores.items()}
    out_dir = ctx.output_dir
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    _write_image_grid(examples, config.grid_samples, out_dir / "reconstructions.png")
    _write_audio(examples, config.audio_samples, trained.config.audio.sample_rate,
                 out_dir / "audio")
    _write_text(examples, out_dir / "captions.json")
    if ctx.logger:
        flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
        ctx.logger.metrics(flat, step=0)
        for artifact in ("metrics.json", "reconstructions.png", "captions.json"):
            ctx.logger.artifact(out_dir / artifact)
        ctx.logger.artifacts(out_dir / "audio", "audio")
    return results


def _read_tokens(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    table = pq.ParquetDataset(str(directory)).read(
        columns=["key", *CODE_COLUMNS.values()])
    columns = table.to_pydict()
    return {key: {name: np.asarray(columns[name][i]) for name in columns if name != "key"}
            for i, key in enumerate(columns["key"])}


def _codes_for(keys: np.ndarray, tokens: dict[str, dict[str, np.ndarray]],
               model: Any) -> dict[str, torch.Tensor]:
    """The token dataset's codes for ``keys``, reshaped to the model's token grids."""
    missing = [str(k) for k in keys if str(k) not in tokens]
    if missing:
        raise KeyError(f"token dataset lacks {len(missing)} val keys, e.g. {missing[:3]}")
    shapes = model.token_shapes()
    out = {}
    for modality, column in CODE_COLUMNS.items():
        if modality not in shapes:  # joint tokens exist only with fusion
            continue
        stacked = np.stack([tokens[str(k)][column].reshape(shapes[modality]) for k in keys])
        out[modality] = torch.from_numpy(stacked.astype(np.int64))
    return out


class _Scores:
    """Accumulates per-sample metrics and the codes seen, for one model."""

    def __init__(self, model: Any) -> None:
        self.sizes = model.codebook_sizes()
        self.sample_rate = model.config.audio.sample_rate
        self.values: dict[str, list[float]] = {}
        self.codes: dict[str, list[np.ndarray]] = {m: [] for m in self.sizes}
        self.paired: dict[str, list[np.ndarray]] = {m: [] for m in MODALITY_CODES}
        self.embeddings: dict[str, list[torch.Tensor]] = {}  # fusion models only

    def add(self, inputs: Any, out: dict[str, torch.Tensor], codes: dict[str, torch.Tensor],
            embeddings: dict[str, torch.Tensor]) -> None:
        img, aud, txt = inputs.has_image, inputs.has_audio, inputs.has_text
        self._extend("image/psnr", M.psnr(inputs.image[img], out["image"][img]))
        self._extend("image/ssim", M.ssim(inputs.image[img], out["image"][img]))
        self._extend("audio/si_snr", M.si_snr(inputs.audio[aud], out["audio"][aud],
                                              inputs.audio_len[aud]))
        self._extend("audio/mel_distance", M.mel_distance(
            inputs.audio[aud], out["audio"][aud], self.sample_rate))
        self._extend("text/token_accuracy", M.token_accuracy(
            inputs.text_ids[txt], out["text_ids"][txt], inputs.text_len[txt]))
        self._extend("text/exact_match", M.exact_match(
            inputs.text_ids[txt], out["text_ids"][txt], inputs.text_len[txt]))
        everyone = torch.ones_like(img)
        for modality, present in (("image", img), ("audio", aud), ("text", txt),
                                  ("joint", everyone)):
            if modality in codes:
                self.codes[modality].append(codes[modality][present].reshape(-1).numpy())
        complete = img & aud & txt  # cross-modal scores need every modality of a sample
        for modality in self.paired:
            self.paired[modality].append(codes[modality][complete].flatten(1).numpy())
        for modality, emb in embeddings.items():
            self.embeddings.setdefault(modality, []).append(emb[complete])

    def _extend(self, key: str, values: torch.Tensor | float) -> None:
        array = np.atleast_1d(np.asarray(torch.as_tensor(values).detach().cpu(), np.float64))
        self.values.setdefault(key, []).extend(array.tolist())

    def summary(self) -> dict[str, float]:
        result = {k: float(np.mean(v)) for k, v in self.values.items() if v}
        for modality, chunks in self.codes.items():
            codes = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
            size = self.sizes[modality]
            result[f"{modality}/codebook_usage"] = float(M.codebook_usage(codes, size))
            result[f"{modality}/codebook_perplexity"] = float(M.codebook_perplexity(codes, size))
        paired = {m: np.concatenate(chunks) for m, chunks in self.paired.items() if chunks}
        for a, b in (("image", "audio"), ("image", "text"), ("audio", "text")):
            if a in paired and b in paired and len(paired[a]) > 1:
                result[f"cross/nmi_{a}_{b}"] = M.cross_modal_nmi(paired[a], paired[b])
            if a in self.embeddings and b in self.embeddings:
                recall = M.retrieval_recall(torch.cat(self.embeddings[a]),
                                            torch.cat(self.embeddings[b]), ks=(1, 5))
                for k, value in recall.items():
                    result[f"cross/retrieval_{a}_to_{b}_r{k}"] = value
        result["samples"] = float(len(self.values.get("image/psnr", [])))
        return result


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(0, 2, 3, 1).numpy()


def _write_image_grid(examples: dict[str, Any], n: int, path: Path) -> None:
    """Rows: original, trained reconstruction, untrained reconstruction; a column per sample."""
    rows = [examples["inputs"].image[:n], examples["trained"]["image"][:n],
            examples["untrained"]["image"][:n]]
    tiles = [np.concatenate(list(_to_uint8(r)), axis=1) for r in rows]  # each (H, n*W, 3)
    grid = np.concatenate(tiles, axis=0)  # (3H, n*W, 3)
    scale = max(1, 256 // grid.shape[0])  # small demo images are unreadable at 1x
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.Resampling.NEAREST).save(path)


def _write_audio(examples: dict[str, Any], n: int, rate: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    inputs = examples["inputs"]
    for i in range(min(n, len(inputs.audio))):
        length = int(inputs.audio_len[i])
        for name, wave in (("original", inputs.audio[i]),
                           ("trained", examples["trained"]["audio"][i]),
                           ("untrained", examples["untrained"]["audio"][i])):
            clip = wave[:length].clamp(-1, 1).numpy()
            soundfile.write(directory / f"sample{i}_{name}.wav", clip, rate)


def _write_text(examples: dict[str, Any], path: Path) -> None:
    from mmvq.text_vocab import decode_ids

    inputs = examples["inputs"]
    captions = []
    for i in range(len(inputs.text_ids)):
        n = int(inputs.text_len[i])
        captions.append({name: decode_ids(ids[i].numpy(), n) for name, ids in (
            ("original", inputs.text_ids), ("trained", examples["trained"]["text_ids"]),
            ("untrained", examples["untrained"]["text_ids"]))})
    path.write_text(json.dumps(captions, indent=2))
