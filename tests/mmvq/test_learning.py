"""The default model learns: a short CPU training run on fixed synthetic data.

150 steps of batch 4 over 32 samples (coloured boxes on textured backgrounds, sine/chirp audio,
captions). Measured on the 2-core dev box (three torch seeds): ~15 s; image PSNR 9.8-10.8 ->
20.1-20.3 dB; text token accuracy 0 -> 0.99-1.0; audio SI-SNR -36..-38 -> -3..-6 dB with 45-54%
of the audio codes in use; total loss 6.0 -> 0.5.
"""

import numpy as np
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.metrics import codebook_usage, psnr, si_snr, token_accuracy
from mmvq.train_step import build_optimizer, generator_step

STEPS, BATCH, SAMPLES = 150, 4, 32


def evaluate(model, x) -> dict[str, float]:
    model.eval()
    codes = model.encode(x)
    rec = model.decode(codes)
    model.train()
    return {
        "psnr": psnr(rec["image"], x.image).mean().item(),
        "text_acc": token_accuracy(x.text_ids, rec["text_ids"], x.text_len).mean().item(),
        "si_snr": si_snr(x.audio, rec["audio"], x.audio_len).mean().item(),
        "audio_usage": codebook_usage(codes["audio"], model.codebook_sizes()["audio"]),
    }


def test_default_model_learns_images_and_text(make_batch):
    torch.manual_seed(0)
    data = make_batch(SAMPLES, seed=1)
    everything = to_model_inputs(data)
    batches = [
        to_model_inputs({k: v[i : i + BATCH] for k, v in data.items()})
        for i in range(0, SAMPLES, BATCH)
    ]
    model = MultimodalTokenizer(TokenizerConfig())
    before = evaluate(model, everything)
    optimizer = build_optimizer(model, lr=2e-3)
    totals = [
        generator_step(model, batches[step % len(batches)], optimizer, grad_clip=1.0)["total"]
        for step in range(STEPS)
    ]
    after = evaluate(model, everything)

    assert after["psnr"] >= before["psnr"] + 3.0, (before, after)
    assert before["text_acc"] < 0.1 and after["text_acc"] >= 0.8, (before, after)
    # Audio: the waveform starts to match (SI-SNR from ~-37 dB to ~-4 dB here) and the codes do
    # not collapse (a too-low mel floor once left 1-3 of 256 audio codes in use).
    assert after["si_snr"] >= before["si_snr"] + 15.0, (before, after)
    assert after["audio_usage"] >= 0.2, (before, after)
    # Averaged over one pass through the data so that batch-to-batch noise does not decide.
    per_pass = len(batches)
    assert np.mean(totals[-per_pass:]) < 0.6 * np.mean(totals[:per_pass]), totals
