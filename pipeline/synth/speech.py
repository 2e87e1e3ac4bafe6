"""Speak captions with eSpeak NG (from the ``espeakng_loader`` wheel) and resample them.

The library is driven through its C API with ctypes in a helper process (`_espeak_worker.py`),
which initialises it once and forks a child per utterance: eSpeak NG keeps synthesis state in
statics that no API call resets, so this is what makes the same request give the same samples
(see that module's docstring). Resampling to the target rate happens here, with torchaudio.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import numpy as np

from pipeline.synth._espeak_worker import read_frame, write_frame

# Voices verified to exist in espeakng_loader 0.2.4's data: base languages, and "+variant" timbres
# from espeak-ng-data/voices/!v (f = female-like, m = male-like).
VOICES: tuple[str, ...] = (
    "en",
    "en-us",
    "en+f2",
    "en+f3",
    "en+m3",
    "en-us+f4",
    "en-us+m2",
    "en-us+m5",
)
RATE_WPM_RANGE = (130, 200)  # slow enough to stay intelligible, fast enough to vary durations
PITCH_RANGE = (30, 70)  # eSpeak's 0-100 pitch scale, 50 = the voice's normal pitch

_WORKER = Path(__file__).with_name("_espeak_worker.py")


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded, or it failed on a request."""


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance to synthesize: text and how to say it."""

    text: str
    voice: str = "en"
    rate: int = 175  # words per minute
    pitch: int = 50  # 0-100
    seed: int = 0  # seeds eSpeak's noise generators (breathy voices); same seed, same samples


def sample_voice(rng: np.random.Generator) -> tuple[str, int, int]:
    """Draw ``(voice, rate_wpm, pitch)`` for one utterance.

    Uniform over `VOICES`, `RATE_WPM_RANGE` and `PITCH_RANGE` (bounds included).
    """
    voice = str(rng.choice(VOICES))
    rate = int(rng.integers(RATE_WPM_RANGE[0], RATE_WPM_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    return voice, rate, pitch


class Speaker:
    """Text-to-speech with eSpeak NG, returning float32 mono audio at ``sample_rate``.

    Parameters
    ----------
    sample_rate : int
        Rate of the returned audio; eSpeak's native 22050 Hz is resampled to it.
    library_path, data_path : str or Path, optional
        ``libespeak-ng`` and its ``espeak-ng-data`` folder; default: those of ``espeakng_loader``.
    lookahead : int
        Requests `speak_all` keeps queued in the helper process, so that synthesis overlaps with
        whatever the caller does with the previous result.

    Raises
    ------
    EspeakError
        If the library or its data cannot be found or loaded.

    Notes
    -----
    Not thread-safe: one helper process serves one stream of requests. Call `close` (or use the
    speaker as a context manager) to stop the helper early; it also stops when the speaker is
    garbage-collected.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        library_path: str | Path | None = None,
        data_path: str | Path | None = None,
        lookahead: int = 2,
    ) -> None:
        if library_path is None or data_path is None:
            default_library, default_data = _loader_paths()
            library_path = library_path or default_library
            data_path = data_path or default_data
        self.sample_rate = sample_rate
        self.lookahead = max(0, lookahead)
        self._process = subprocess.Popen(
            [sys.executable, str(_WORKER), str(library_path), str(data_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._finalizer = weakref.finalize(self, _stop, self._process)
        self.native_rate = self._handshake()

    def speak(
        self, text: str, voice: str = "en", rate_wpm: int = 175, pitch: int = 50, seed: int = 0
    ) -> np.ndarray:
        """Synthesize one utterance.

        Parameters
        ----------
        text : str
            What to say (UTF-8, plain text).
        voice : str
            eSpeak NG voice name, optionally with a ``+variant`` (see `VOICES`).
        rate_wpm : int
            Speaking rate in words per minute, 80-450.
        pitch : int
            Base pitch, 0-100 (50 is the voice's normal pitch).
        seed : int
            Seed of eSpeak's noise generators; the same arguments always give the same samples.

        Returns
        -------
        numpy.ndarray
            float32 mono waveform in [-1, 1] at ``self.sample_rate``, shape (T,).
        """
        (audio,) = self.speak_all([SpeechRequest(text, voice, rate_wpm, pitch, seed)])
        return audio

    def speak_all(self, requests: Iterable[SpeechRequest]) -> Iterator[np.ndarray]:
        """Synthesize many utterances, in order, keeping `lookahead` of them in flight.

        Parameters
        ----------
        requests : iterable of SpeechRequest
            Consumed lazily, up to ``lookahead`` items ahead of the results.

        Yields
        ------
        numpy.ndarray
            One float32 waveform per request, as `speak` returns it.
        """
        pending = 0
        try:
            for request in requests:
                self._send(request)
                pending += 1
                if pending > self.lookahead:
                    pending -= 1
                    yield self._receive()
            while pending:
                pending -= 1
                yield self._receive()
        finally:
            # An abandoned iteration must not leave answers in the pipe for the next call.
            for _ in range(pending):
                self._receive_pcm(raise_errors=False)

    def close(self) -> None:
        """Stop the helper process."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _handshake(self) -> int:
        frame = read_frame(self._process.stdout)
        if frame is None or frame[:1] != b"O":
            detail = frame[1:].decode("utf-8", "replace") if frame else "helper exited"
            self.close()
            raise EspeakError(f"cannot start eSpeak NG: {detail}")
        (rate,) = struct.unpack("<i", frame[1:5])
        return rate

    def _send(self, request: SpeechRequest) -> None:
        _check_request(request)
        write_frame(self._process.stdin, json.dumps(asdict(request)).encode("utf-8"))

    def _receive(self) -> np.ndarray:
        pcm = self._receive_pcm(raise_errors=True)
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0  # (T,)
        if self.native_rate == self.sample_rate:
            return audio
        # Here, not at the top: importing synth (a plan does) loads no torch.
        import torch
        import torchaudio

        with _one_torch_thread():
            resampled = torchaudio.functional.resample(
                torch.from_numpy(audio), self.native_rate, self.sample_rate
            )
        return resampled.numpy().astype(np.float32, copy=False)

    def _receive_pcm(self, raise_errors: bool) -> bytes:
        frame = read_frame(self._process.stdout)
        if frame is None:
            raise EspeakError(f"eSpeak NG helper exited (code {self._process.poll()})")
        if frame[:1] != b"O" and raise_errors:
            raise EspeakError(frame[1:].decode("utf-8", "replace"))
        return frame[1:]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded for a moment.

    A few seconds of audio gain nothing from intra-op threads, and with the eSpeak helper (or other
    work) busy on the other cores OpenMP's spin-waits made each resample ~40x slower (measured:
    120 ms instead of 3 ms on 2 cores). One thread also keeps the float sums in one fixed order,
    whatever the machine's core count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_request(request: SpeechRequest) -> None:
    if not request.text.strip():
        raise ValueError("cannot speak empty text")
    if not 80 <= request.rate <= 450:  # espeakRATE_MINIMUM..espeakRATE_MAXIMUM
        raise ValueError(f"rate must be 80-450 words per minute, got {request.rate}")
    if not 0 <= request.pitch <= 100:
        raise ValueError(f"pitch must be 0-100, got {request.pitch}")


def _loader_paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as error:
        raise EspeakError(
            "eSpeak NG needs the espeakng-loader package (pip install espeakng-loader==0.2.4)"
        ) from error
    try:
        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except RuntimeError as error:  # get_data_path raises when the data folder is missing
        raise EspeakError(f"espeakng_loader is incomplete: {error}") from error


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.stdin.close()  # end of requests: the helper leaves its loop
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None and not stream.closed:
            stream.close()
