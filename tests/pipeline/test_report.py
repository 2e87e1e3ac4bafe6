"""The evaluation report: plots, the HTML page, and a headless Chromium rendering of it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
from PIL import Image

from pipeline import report

RATE = 8000


def _evaluate_outputs(out_dir):
    """What evaluate writes: a grid PNG, WAV clips per model, captions, usage counts."""
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 255, (3 * 64, 4 * 64, 3), dtype=np.uint8)
    Image.fromarray(grid).save(out_dir / "reconstructions.png")
    (out_dir / "audio").mkdir()
    t = np.arange(RATE) / RATE
    for i in range(2):
        for name, freq in (("original", 500), ("trained", 500), ("untrained", 2500)):
            tone = 0.5 * np.sin(2 * np.pi * freq * (i + 1) * t)
            soundfile.write(out_dir / "audio" / f"sample{i}_{name}.wav", tone, RATE)
    captions = [{"original": "a red <circle>", "trained": "a red <circle>",
                 "untrained": "zzz"}]
    (out_dir / "captions.json").write_text(json.dumps(captions))
    counts = {"image": np.bincount(rng.integers(0, 40, 500), minlength=256),
              "text": np.bincount(rng.integers(0, 3, 500), minlength=256)}
    report.plot_usage(counts, out_dir / report.USAGE_PNG)


RESULTS = {"trained": {"image/psnr": 21.5, "image/psnr_flat": 14.125, "audio/stoi": 0.8125,
                       "audio/pesq": 2.375, "text/exact_match": 1.0, "image/rfid": 42.5,
                       "image/lpips": 0.1875},
           "untrained": {"image/psnr": 10.25, "image/psnr_flat": 14.125, "audio/stoi": 0.25,
                         "audio/pesq": 1.0625, "text/exact_match": 0.0, "image/rfid": 310.75,
                         "image/lpips": 0.6875}}
# The scores people compare tokenizers by, as the rendered page must show them.
SHOWN = ("audio/pesq", "2.3750", "audio/stoi", "0.8125", "image/psnr_flat", "14.1250",
         "image/rfid", "42.5000", "310.7500", "image/lpips", "0.1875")


def test_spectrogram_peaks_at_the_tone_frequency():
    t = np.arange(RATE) / RATE
    spec = report.spectrogram(np.sin(2 * np.pi * 1000 * t), n_fft=256, hop=64)
    assert spec.shape == (129, 1 + (RATE - 256) // 64)
    assert int(np.argmax(spec.mean(axis=1))) == 1000 * 256 // RATE  # bin 32
    assert spec.max() - spec.min() <= 80.0 + 1e-9


@pytest.mark.parametrize("use_matplotlib", [True, False])
def test_plots_draw_with_and_without_matplotlib(tmp_path, use_matplotlib):
    counts = {"image": np.bincount([0, 0, 0, 5], minlength=16), "audio": np.ones(8, int)}
    report.plot_usage(counts, tmp_path / "usage.png", use_matplotlib=use_matplotlib)
    t = np.arange(4000) / RATE
    clips = [{"original": np.sin(2 * np.pi * 440 * t), "trained": np.zeros(4000)}]
    report.plot_spectrograms(clips, RATE, tmp_path / "spec.png", use_matplotlib=use_matplotlib)
    for name in ("usage.png", "spec.png"):
        pixels = np.asarray(Image.open(tmp_path / name).convert("L"), np.float64)
        assert pixels.std() > 5, name  # something was drawn, not a blank canvas


@pytest.mark.parametrize("min_height, scale", [(0, 1), (40, 2), (47, 2)])
def test_image_grid_puts_rows_under_each_other_and_upscales_whole(tmp_path, min_height, scale):
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 255, (3, 8, 6, 3), dtype=np.uint8) for _ in range(2)]  # n=3, 8x6
    report.write_image_grid(rows, tmp_path / "grid.png", min_height=min_height)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 8 * scale, 3 * 6 * scale, 3)
    grid = grid[::scale, ::scale]  # nearest neighbour: every scale-th pixel is the original
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            assert np.array_equal(grid[r * 8:(r + 1) * 8, i * 6:(i + 1) * 6], image), (r, i)


def test_report_links_existing_files_and_tables(tmp_path):
    _evaluate_outputs(tmp_path)
    previous = {"version": 3, "metrics": {"image/psnr": 20.0}}
    page = report.write_report(tmp_path, RESULTS, previous, {"split": "val (2 samples)"})
    text = page.read_text()
    links = re.findall(r'src="([^"]+)"', text)
    assert {"reconstructions.png", report.USAGE_PNG, report.SPECTROGRAM_PNG,
            "audio/sample1_untrained.wav"} <= set(links)
    assert all(not link.startswith("/") and (tmp_path / link).is_file() for link in links)
    assert "registered v3" in text and "+1.5000" in text  # 21.5 vs the previous 20.0
    assert "a red &lt;circle&gt;" in text  # captions are escaped
    assert all(shown in text for shown in SHOWN)
    assert "No earlier registered version" in report.write_report(tmp_path, RESULTS).read_text()


# .ci/run installs Debian's chromium where it is missing, so in CI this runs.
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH (Debian package 'chromium'); the headless "
                           "rendering check needs it")
def test_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    _evaluate_outputs(out)
    page = report.write_report(out, RESULTS, None, {"split": "val"})
    shot = tmp_path / "report.png"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()],
        check=False, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    # The page as the browser built it: the metrics table holds the speech and baseline scores.
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    table = dom[dom.index('<table id="metrics">'):]
    table = table[:table.index("</table>")]
    for text in SHOWN:
        assert text in table, text
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels.std() > 20  # text, tables and images, not a blank page
    # The reconstruction grid is random noise: its rendering shows as many distinct colours,
    # which text and table borders alone never produce.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 5000
