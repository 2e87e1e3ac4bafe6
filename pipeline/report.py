"""The evaluation report: one self-contained HTML page next to evaluate's outputs.

It shows the protocol, a metrics table (trained, untrained baseline, and the previously
registered version with the change), for a model trained with fusion the fused-vs-separate
comparison (cross-modal retrieval through the same probe, NMI, reconstruction, against the newest
registered version trained without fusion), the reconstruction grid, a codebook usage histogram per
codebook, spectrograms and audio players for the WAV clips, and original vs decoded captions.
Every link is relative (``reconstructions.png``, ``audio/sample0_trained.wav``), so the folder
can be moved, served, or opened from MLflow's artifact view as it is.

Plots use matplotlib when it is installed and are drawn with numpy and PIL otherwise.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image, ImageDraw

REPORT = "report.html"
USAGE_PNG = "codebook_usage.png"
SPECTROGRAM_PNG = "spectrograms.png"
MODELS = ("original", "trained", "untrained")  # rows of the grids, as evaluate writes them


def _matplotlib() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to PNG
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------- plots

def write_image_grid(rows: Sequence[np.ndarray], path: Path, min_height: int = 0) -> None:
    """Image rows as one PNG: row ``r`` shows ``rows[r]`` side by side.

    Parameters
    ----------
    rows : each (n, H, W, 3) uint8 (:func:`mmvq.modalities.image.to_uint8`), e.g. originals
        over reconstructions; the same n, H and W in every row
    path : the PNG to write
    min_height : upscale by the largest whole factor (nearest neighbour) that keeps the grid
        at most this tall: small demo images are unreadable at 1x; 0: as they are
    """
    tiles = [np.concatenate(list(r), axis=1) for r in rows]  # each (H, n*W, 3)
    grid = np.concatenate(tiles, axis=0)  # (len(rows)*H, n*W, 3)
    scale = max(1, min_height // grid.shape[0])
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale),
                             Image.Resampling.NEAREST)
    image.save(path)


def plot_usage(counts: Mapping[str, np.ndarray], path: Path, use_matplotlib: bool = True) -> None:
    """One bar chart per codebook: how often each code was used, codes sorted by frequency.

    Sorting makes collapse visible at a glance: a healthy codebook is a long flat tail, a
    collapsed one a few tall bars and zeros.
    """
    plt = _matplotlib() if use_matplotlib else None
    names = list(counts)
    if plt is not None:
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            c = np.sort(np.asarray(counts[name]))[::-1]
            used = int((c > 0).sum())
            # One step polygon, not a patch per code: bar() over 1024+ codes is slow to draw.
            ax.fill_between(np.arange(len(c)), c, step="post", color="#3b6ea8")
            ax.set_title(f"{name}: {used}/{len(c)} codes used")
            ax.set_xlabel("code (by frequency)")
            ax.set_ylabel("count")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    panels = [_bars(np.sort(np.asarray(counts[n]))[::-1], n) for n in names]
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def _bars(values: np.ndarray, title: str, height: int = 200, width: int = 300) -> np.ndarray:
    """A bar chart as an (height, width, 3) uint8 image, for when matplotlib is absent."""
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = max(float(values.max()), 1.0) if len(values) else 1.0
    plot_h = height - 30
    for i, v in enumerate(values):
        x = int(i * width / max(len(values), 1))
        draw.rectangle([x, height - 5 - int(v / top * plot_h), x, height - 5], fill="#3b6ea8")
    draw.text((5, 5), f"{title}: {int((values > 0).sum())}/{len(values)} codes used",
              fill="black")
    return np.asarray(canvas)


def spectrogram(wave: np.ndarray, n_fft: int = 256, hop: int = 64) -> np.ndarray:
    """Log-magnitude STFT in dB, (freq, frames), Hann window; 80 dB below the peak floored."""
    wave = np.asarray(wave, np.float64)
    if len(wave) < n_fft:
        wave = np.pad(wave, (0, n_fft - len(wave)))
    frames = 1 + (len(wave) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]  # (frames, n_fft)
    spectrum = np.abs(np.fft.rfft(wave[index] * np.hanning(n_fft), axis=1)).T  # (freq, frames)
    db = 20 * np.log10(spectrum + 1e-8)
    return np.maximum(db, db.max() - 80.0)


def plot_spectrograms(clips: Sequence[Mapping[str, np.ndarray]], rate: int, path: Path,
                      use_matplotlib: bool = True) -> None:
    """A grid of spectrograms: one row per clip, one column per model in :data:`MODELS`."""
    plt = _matplotlib() if use_matplotlib else None
    if plt is not None:
        fig, axes = plt.subplots(len(clips), len(MODELS), figsize=(3.2 * len(MODELS),
                                                                   2.2 * len(clips)),
                                 squeeze=False)
        for row, clip in enumerate(clips):
            for col, name in enumerate(MODELS):
                ax = axes[row][col]
                if name in clip:
                    seconds = len(clip[name]) / rate
                    ax.imshow(spectrogram(clip[name]), origin="lower", aspect="auto",
                              cmap="magma", extent=(0, seconds, 0, rate / 2000))
                ax.set_title(f"sample {row} {name}", fontsize=9)
                ax.set_xlabel("s", fontsize=8)
                ax.set_ylabel("kHz", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    rows = []
    for clip in clips:
        tiles = []
        for name in MODELS:
            s = spectrogram(clip[name]) if name in clip else np.zeros((129, 100))
            s = (s - s.min()) / max(float(np.ptp(s)), 1e-8)
            tile = Image.fromarray((s[::-1] * 255).astype(np.uint8)).resize((240, 120))
            tiles.append(np.asarray(tile.convert("RGB")))
        rows.append(np.concatenate(tiles, axis=1))  # (120, 3*240, 3)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# ----------------------------------------------------------------------------- the page

def write_report(out_dir: Path, results: Mapping[str, Mapping[str, float]],
                 previous: Mapping[str, Any] | None = None,
                 protocol: Mapping[str, Any] | None = None,
                 title: str = "mmvq evaluation",
                 fused_vs_separate: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/report.html`` over the files evaluate put in ``out_dir``.

    Parameters
    ----------
    out_dir : evaluate's output directory; ``reconstructions.png``, ``codebook_usage.png``,
        ``audio/sample{i}_{model}.wav`` and ``captions.json`` are shown when present
    results : ``{"trained": {metric: value}, "untrained": {...}}``
    previous : the previously registered version (``pipeline.register.previous_version``),
        compared metric by metric; None when there is none
    protocol : what was evaluated (split, sample count, sizes), shown as a list
    fused_vs_separate : for a fusion model, evaluate's ``fused_vs_separate.json`` (probe
        retrieval of it and of the separate model); ``results["separate"]`` then holds the
        separate model's metrics on the same split when there is one

    Returns
    -------
    The report's path. Spectrograms of the WAV clips are written as ``spectrograms.png``.
    """
    out_dir = Path(out_dir)
    sections = [f"<h1>{html.escape(title)}</h1>", _protocol(protocol or {}),
                "<h2>Metrics</h2>", _metrics_table(results, previous)]
    if fused_vs_separate is not None:
        sections += _fused_vs_separate(results, fused_vs_separate)
    for file, heading, caption in (
            ("reconstructions.png", "Reconstructions",
             "rows: original, trained (decoded from the token dataset), untrained baseline"),
            (USAGE_PNG, "Codebook usage", ("codes per codebook sorted by how often they occur "
             "in the evaluation split (trained model)"))):
        if (out_dir / file).is_file():
            sections += [f"<h2>{heading}</h2>", (f'<figure><img src="{file}" alt="{heading}">'
                         f"<figcaption>{caption}</figcaption></figure>")]
    sections += _audio(out_dir)
    sections += _captions(out_dir / "captions.json")
    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    path = out_dir / REPORT
    path.write_text(page)
    return path


def _protocol(protocol: Mapping[str, Any]) -> str:
    if not protocol:
        return ""
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                    for k, v in protocol.items())
    return f"<h2>Protocol</h2><ul>{items}</ul>"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}"


def _metrics_table(results: Mapping[str, Mapping[str, float]],
                   previous: Mapping[str, Any] | None) -> str:
    trained, untrained = results.get("trained", {}), results.get("untrained", {})
    before = dict(previous["metrics"]) if previous else {}
    head = ["metric", "trained", "untrained"]
    if previous:
        head += [f"registered v{previous['version']}", "change"]
    rows = []
    for key in sorted(k for k in trained if k != "samples"):  # the count is in the protocol
        cells = [html.escape(key), _fmt(trained[key]), _fmt(untrained.get(key))]
        if previous:
            old = before.get(key)
            cells += [_fmt(old), "–" if old is None else f"{trained[key] - old:+.4f}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    note = ("" if previous else "<p>No earlier registered version to compare with.</p>")
    return f'<table id="metrics">{header}{"".join(rows)}</table>{note}'


_PAIR_NAMES = {"image_to_text": "image→text", "audio_to_text": "audio→text",
               "image_to_audio": "image→audio"}
_STAT_NAMES = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "median_rank": "median rank"}
# Metrics of both models on the evaluated split (evaluate scores the separate model there too).
_SHARED_METRICS = ("cross/nmi_image_text", "cross/nmi_audio_text", "cross/nmi_image_audio",
                   "image/psnr", "image/ssim", "audio/mel_distance", "audio/si_snr",
                   "text/exact_match")


def _fused_vs_separate(results: Mapping[str, Mapping[str, float]],
                       comparison: Mapping[str, Any]) -> list[str]:
    """The section comparing the fused model with the newest separately trained one."""
    fused, separate = comparison.get("fused"), comparison.get("separate")
    out = ["<h2>Fused vs separate</h2>"]
    if fused is None:
        return [*out, f"<p>{html.escape(str(comparison.get('note')))}</p>"]
    chance = fused["chance"]
    probed = fused.get("probe") is not None
    how = (f"through the same linear probe for both models (each modality's quantized latents "
           f"pooled and mapped into one space, fitted on the "
           f"{html.escape(comparison['probe_split'])} split with the tokenizer frozen; "
           f"<code>mmvq.alignment_probe</code>)" if probed else
           "through the fused model's own heads (no probe: there is no separate model to "
           "compare with)")
    out.append(
        f"<p>Cross-modal retrieval {how}, scored on the {html.escape(comparison['split'])} "
        f"split: {fused['val_samples']} samples, {fused['shared_caption_samples']} of them "
        f"share their caption with another (those count as hits). Chance: "
        + ", ".join(f"R@{k[1:]} {v:.3f}" for k, v in chance.items())
        + ". Fused heads: the fused model's own embeddings.</p>")
    if separate is None:
        out.append(f"<p>{html.escape(str(comparison.get('note')))}</p>")
    label = (f"separate v{separate['version']}" if separate else "separate")
    header = "".join(f"<th>{h}</th>" for h in ("metric", "fused (this model)", label,
                                               "fused vs separate"))
    rows = []
    for key, value in (fused.get("probe") or {}).items():
        pair, stat = key.split("/")
        other = separate["probe"][key] if separate else None
        name = f"{_PAIR_NAMES.get(pair, pair)} {_STAT_NAMES.get(stat, stat)} (probe)"
        if other is None:
            change = "–"
        elif stat == "median_rank":
            change = f"{value - other:+.1f}"
        else:
            change = f"{value / other:.2f}×" if other > 0 else "–"
        if stat == "median_rank":  # a rank, not a score: one decimal (a median of two)
            rows.append((name, f"{value:.1f}", "–" if other is None else f"{other:.1f}",
                         change))
        else:
            rows.append((name, _fmt(value), _fmt(other), change))
    for key, value in (fused.get("heads") or {}).items():
        pair, stat = key.split("/")
        if stat == "r5" or not probed:  # without the probe the heads are all there is
            text = f"{value:.1f}" if stat == "median_rank" else _fmt(value)
            name = f"{_PAIR_NAMES.get(pair, pair)} {_STAT_NAMES.get(stat, stat)} (fused heads)"
            rows.append((name, text, "–", "–"))
    trained, theirs = results.get("trained", {}), results.get("separate", {})
    for key in _SHARED_METRICS:
        if key in trained:
            other = theirs.get(key)
            change = "–" if other is None else f"{trained[key] - other:+.4f}"
            rows.append((key, _fmt(trained[key]), _fmt(other), change))
    if "joint/codebook_usage" in trained:
        rows.append(("joint/codebook_usage", _fmt(trained["joint/codebook_usage"]), "–", "–"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    out.append(f'<table id="fused-vs-separate"><tr>{header}</tr>{body}</table>')
    return out


def _audio(out_dir: Path) -> list[str]:
    """Audio players per clip and model, and the spectrogram grid drawn from the same WAVs."""
    clips, rate = [], 16000
    i = 0
    while (out_dir / "audio" / f"sample{i}_original.wav").is_file():
        clip = {}
        for name in MODELS:
            file = out_dir / "audio" / f"sample{i}_{name}.wav"
            if file.is_file():
                clip[name], rate = soundfile.read(file, dtype="float32")
        clips.append(clip)
        i += 1
    if not clips:
        return []
    plot_spectrograms(clips, rate, out_dir / SPECTROGRAM_PNG)
    rows = []
    for i in range(len(clips)):
        cells = "".join(f'<td><audio controls preload="none" src="audio/sample{i}_{name}.wav">'
                        f"</audio></td>" for name in MODELS)
        rows.append(f"<tr><td>sample {i}</td>{cells}</tr>")
    header = "<tr><th></th>" + "".join(f"<th>{m}</th>" for m in MODELS) + "</tr>"
    return ["<h2>Audio</h2>", (f'<figure><img src="{SPECTROGRAM_PNG}" alt="spectrograms">'
            "<figcaption>log-magnitude spectrograms (dB) of the clips below</figcaption>"
            "</figure>"), f'<table id="audio">{header}{"".join(rows)}</table>']


def _captions(path: Path, limit: int = 16) -> list[str]:
    if not path.is_file():
        return []
    captions = json.loads(path.read_text())[:limit]
    header = "<tr>" + "".join(f"<th>{m}</th>" for m in MODELS) + "</tr>"
    rows = []
    for caption in captions:
        cells = []
        for name in MODELS:
            text = html.escape(caption.get(name, ""))
            same = name != "original" and caption.get(name) == caption.get("original")
            cells.append(f'<td class="{"same" if same else ""}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ["<h2>Text</h2>", f'<table id="text">{header}{"".join(rows)}</table>',
            "<p>Green: decoded exactly as the original.</p>"]


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: left; }}
th {{ background: #e8eef6; }}
td.same {{ background: #e3f4e1; }}
img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 90%; }}
</style></head>
<body>
{body}
</body></html>
"""
