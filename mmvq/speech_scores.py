"""Speech scores that codec papers and listeners compare by: STOI and PESQ.

SI-SNR and the mel distance say how close a waveform is; neural codecs are judged by ear, and
the numbers that track that are intelligibility (STOI, Taal et al. 2011, 0..1) and perceived
quality (PESQ, ITU-T P.862, MOS-LQO about 1..4.5), as in EnCodec, DAC and Codec-SUPERB. Both
come from their reference implementations (``pystoi``, ``pesq``), per sample, over the sample's
real length. PESQ is defined at 8 kHz (narrow-band) and 16 kHz (wide-band) only: other rates
are resampled to 16 kHz first (``soxr``, as preprocess resamples).

A clip PESQ cannot score (silence in the reference: "no utterances detected") gives NaN, which
:func:`speech_scores` leaves out, so a mean is over the clips that were scored.
"""

from __future__ import annotations

import math

import numpy as np

PESQ_MODES = {8000: "nb", 16000: "wb"}  # the rates P.862 (nb) and P.862.2 (wb) define
PESQ_RATE = 16000  # where other rates are resampled to


def stoi(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float:
    """Short-time objective intelligibility of ``estimate`` against ``reference`` (1-D)."""
    from pystoi import stoi as reference_stoi

    return float(reference_stoi(reference.astype(np.float64), estimate.astype(np.float64), rate,
                                extended=False))


def pesq(reference: np.ndarray, estimate: np.ndarray, rate: int) -> float:
    """PESQ MOS-LQO of ``estimate`` against ``reference`` (1-D), or NaN where P.862 finds no
    speech to score."""
    from pesq import PesqError
    from pesq import pesq as reference_pesq

    if not np.any(reference) or not np.any(estimate):  # silence: pesq would divide by zero
        return math.nan
    if rate not in PESQ_MODES:
        import soxr

        reference = soxr.resample(reference.astype(np.float32), rate, PESQ_RATE)
        estimate = soxr.resample(estimate.astype(np.float32), rate, PESQ_RATE)
        rate = PESQ_RATE
    try:
        return float(reference_pesq(rate, reference.astype(np.float32),
                                    estimate.astype(np.float32), PESQ_MODES[rate]))
    except PesqError:  # NoUtterancesError and kin: nothing that P.862 can score
        return math.nan


def speech_scores(reference: np.ndarray, estimate: np.ndarray, lengths: np.ndarray,
                  rate: int) -> dict[str, list[float]]:
    """``stoi`` and ``pesq`` of each clip of a batch over its first ``lengths[i]`` samples.

    Parameters
    ----------
    reference, estimate : (B, T) waveforms
    lengths : (B,) real samples per clip
    rate : their sample rate

    Returns
    -------
    ``{"stoi": [...], "pesq": [...]}``; clips shorter than STOI's 30-frame minimum (~0.4 s) and
    those PESQ cannot score are left out of that list.
    """
    out: dict[str, list[float]] = {"stoi": [], "pesq": []}
    for ref, est, n in zip(reference, estimate, lengths, strict=True):
        n = int(n)
        if n < int(0.4 * rate):
            continue
        out["stoi"].append(stoi(ref[:n], est[:n], rate))
        value = pesq(ref[:n], est[:n], rate)
        if not math.isnan(value):
            out["pesq"].append(value)
    return out

