"""eSpeak NG synthesis server, run as a script by `pipeline.synth.speech.Speaker`.

    python _espeak_worker.py LIBRARY_PATH DATA_PATH

It loads ``libespeak-ng`` with ctypes, initialises it once, then answers requests on stdin/stdout.
Every frame is a 4-byte little-endian length and a payload. The first frame it sends is
``b"O" + int32 sample rate`` or ``b"E" + UTF-8 message``. Each request is a JSON object
(``text``, ``voice``, ``rate``, ``pitch``, ``seed``); each answer is ``b"O" + native-endian int16
PCM`` or ``b"E" + message``. End of stdin ends the server.

Why a separate process that forks per utterance: eSpeak NG keeps synthesis state in
function-level statics that no API call resets (e.g. the pitch-flutter index in wavegen.c's
``AdvanceParameters``; not even ``espeak_Terminate`` plus a new ``espeak_Initialize`` clears it).
The same text spoken twice in one process therefore gives different samples (measured: lengths
differ by ~200 samples). A child forked from the freshly initialised server starts every utterance
from the same state, so the audio depends only on the request. The fork is of this small process
(no torch), which costs about a millisecond.

This file imports only the standard library and must stay importable as a plain script.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path

# Constants from eSpeak NG's speak_lib.h (API revision 12).
AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: like RETRIEVAL, but Synth returns when done
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data dir calls exit(1) in the library
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1  # espeak_POSITION_TYPE
ESPEAK_RATE, ESPEAK_PITCH = 1, 3  # espeak_PARAMETER
EE_OK, EE_NOT_FOUND = 0, 2  # espeak_ERROR
BUFFER_MS = 100  # length of the audio chunks handed to the callback; any value works

# int t_espeak_callback(short *wav, int numsamples, espeak_EVENT *events); events unused here.
SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakLibrary:
    """The loaded and initialised library; one per process because its state is global."""

    def __init__(self, library_path: str, data_path: str) -> None:
        _check_paths(library_path, data_path)
        try:
            self.lib = ctypes.CDLL(library_path)
        except OSError as error:
            raise RuntimeError(f"cannot load eSpeak NG library {library_path}: {error}") from error
        self.data_path = Path(data_path)
        self._declare_functions()
        rate = self.lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, os.fsencode(data_path), ESPEAK_INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data path {data_path}")
        self.sample_rate = rate
        self._chunks: list[bytes] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = SYNTH_CALLBACK(self._collect)
        self.lib.espeak_SetSynthCallback(self._callback)

    def _declare_functions(self) -> None:
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # const void *text
            ctypes.c_size_t,  # size_t size
            ctypes.c_uint,  # unsigned int position
            ctypes.c_int,  # espeak_POSITION_TYPE position_type
            ctypes.c_uint,  # unsigned int end_position
            ctypes.c_uint,  # unsigned int flags
            ctypes.c_void_p,  # unsigned int *unique_identifier
            ctypes.c_void_p,  # void *user_data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # espeak-ng >= 1.52 (espeak-ng.h)
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = ctypes.c_int

    def _collect(self, wav, numsamples: int, events) -> int:
        # wav is NULL at the end of synthesis; numsamples may be 0 mid-stream.
        if wav and numsamples > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * numsamples))
        return 0  # 0 = continue synthesis

    def speak(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> bytes:
        """Synthesize one utterance and return its int16 PCM at `sample_rate`."""
        self._set_voice(voice)
        for parameter, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch)):
            if self.lib.espeak_SetParameter(parameter, int(value), 0) != EE_OK:
                raise RuntimeError(f"espeak_SetParameter({parameter}, {value}) failed")
        self._seed(seed)
        data = text.encode("utf-8") + b"\0"
        self._chunks.clear()
        status = self.lib.espeak_Synth(
            data, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None
        )
        if status != EE_OK:
            raise RuntimeError(f"espeak_Synth failed with espeak_ERROR {status}")
        self.lib.espeak_Synchronize()
        return b"".join(self._chunks)

    def _set_voice(self, voice: str) -> None:
        # espeak_SetVoiceByName accepts an unknown "+variant" silently, so check the file first.
        _, _, variant = voice.partition("+")
        if variant and not (self.data_path / "voices" / "!v" / variant).is_file():
            raise ValueError(f"unknown eSpeak NG voice variant {variant!r} in {voice!r}")
        status = self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if status == EE_NOT_FOUND:
            raise ValueError(f"unknown eSpeak NG voice {voice!r}")
        if status != EE_OK:
            raise RuntimeError(f"espeak_SetVoiceByName({voice!r}) failed with {status}")

    def _seed(self, seed: int) -> None:
        # Breathy variants (e.g. +f3) add noise from eSpeak's own generator and from libc rand().
        seed &= 0x7FFFFFFF
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(seed)
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))


def _check_paths(library_path: str, data_path: str) -> None:
    if not Path(library_path).is_file():
        raise RuntimeError(f"eSpeak NG library not found at {library_path}")
    # espeak_Initialize accepts the espeak-ng-data folder itself or its parent.
    candidates = [Path(data_path), Path(data_path) / "espeak-ng-data"]
    if not any((folder / "phondata").is_file() for folder in candidates):
        raise RuntimeError(f"eSpeak NG data (phondata) not found in {data_path}")


def read_frame(stream) -> bytes | None:
    """Read one length-prefixed frame; None at a clean end of stream."""
    header = stream.read(4)
    if not header:
        return None
    if len(header) != 4:
        raise EOFError("truncated frame header")
    (length,) = struct.unpack("<I", header)
    payload = stream.read(length)
    if len(payload) != length:
        raise EOFError(f"truncated frame: {len(payload)} of {length} bytes")
    return payload


def write_frame(stream, payload: bytes) -> None:
    """Write one length-prefixed frame and flush it."""
    stream.write(struct.pack("<I", len(payload)) + payload)
    stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _answer(engine: EspeakLibrary, request: bytes) -> bytes:
    try:
        fields = json.loads(request)
        pcm = engine.speak(
            fields["text"], fields["voice"], fields["rate"], fields["pitch"], fields["seed"]
        )
        return b"O" + pcm
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as error:
        # Reported to the parent, which raises it; anything else kills the child, which the
        # server reports as a dead synthesis process.
        return b"E" + f"{type(error).__name__}: {error}".encode()


def speak_in_child(engine: EspeakLibrary, request: bytes) -> bytes:
    """Answer one request in a forked child, so this process's eSpeak state stays pristine."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: answer, hand the bytes over, leave without running any cleanup
        try:
            os.close(read_end)
            _write_all(write_end, _answer(engine, request))
        finally:
            os._exit(0)
    os.close(write_end)
    answer = _read_all(read_end)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not answer:
        return b"E" + f"synthesis process died (wait status {status})".encode()
    return answer


def main(argv: list[str]) -> int:
    # The protocol owns the original stdout; anything the library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    try:
        engine = EspeakLibrary(argv[1], argv[2])
    except (RuntimeError, OSError) as error:
        write_frame(protocol, b"E" + str(error).encode())
        return 1
    write_frame(protocol, b"O" + struct.pack("<i", engine.sample_rate))
    while (request := read_frame(requests)) is not None:
        write_frame(protocol, speak_in_child(engine, request))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
