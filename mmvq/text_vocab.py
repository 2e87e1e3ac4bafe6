"""Text vocabularies: UTF-8 bytes (the default) or a byte-level BPE trained on captions.

Both map text to integer ids with the same layout at the bottom: ids 0..255 are the UTF-8 bytes
and id 256 is padding. The byte vocabulary stops there (257 ids). It needs no trained file, covers
every language and never produces an unknown token, which is what a tokenizer *of* text for a
downstream language model wants (ByT5, Xue et al. 2022).

A byte-level BPE (Sennrich et al. 2016, in GPT-2's byte-level form, Radford et al. 2019) adds one
id per learned merge of two existing ids, 257 upwards. Captions then take several times fewer
positions, so the text codec is cheaper and each code carries a word piece rather than a byte.
Every string still encodes (the bytes are the fallback) and ``decode(encode(s)) == s`` exactly.
The trained vocabulary is a JSON file with a format version and a sha256 of its content, so a
checkpoint can refuse a vocabulary it was not trained with.

Both classes satisfy the :class:`TextVocab` protocol that the pipeline and the tokenizer use.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from mmvq.config import BYTE_VOCAB_SIZE, TextCodecConfig
from mmvq.config_io import ConfigError

PAD_ID = 256  # one past the last byte value; the same id in every vocabulary
VOCAB_SIZE = BYTE_VOCAB_SIZE  # the byte vocabulary: 256 byte values + PAD (257)
FIRST_MERGE_ID = VOCAB_SIZE  # a BPE's merge i gets id FIRST_MERGE_ID + i

VOCAB_FILE = "text_vocab.json"  # name of a BPE vocabulary inside a checkpoint or stage output
TOKENIZER_JSON = "tokenizer.json"  # the same BPE for Hugging Face tokenizers, beside it
BPE_FORMAT = "mmvq-byte-bpe"
BPE_VERSION = 1  # bumped whenever the meaning of a saved vocabulary changes; load refuses others

# Pre-tokenizer: BPE merges never cross these chunk boundaries, so a merge is a word piece and
# not "d a" spanning two words (GPT-2's rule, written with Python's re, which lacks \p{L}): an
# optional leading space plus a run of letters, of digits or of other symbols; underscores; and
# whitespace runs (all but the last whitespace character when a word follows, so that word keeps
# its leading space). Every character falls into one alternative, so the chunks concatenate back
# to the text.
PRETOKENIZE_PATTERN = r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+|_+|\s+(?!\S)|\s+"
_PRETOKENIZE = re.compile(PRETOKENIZE_PATTERN)

# The same pre-tokenizer in the Oniguruma syntax of Hugging Face ``tokenizers``, for the
# ``tokenizer.json`` a BPE exports. The two engines disagree on ``\s`` and ``\w`` (Python's
# whitespace includes U+001C..U+001F, Oniguruma's words include combining marks), so the classes
# are spelled out: Python's 29 whitespace characters (``str.isspace``), letters plus the numbers
# that are not decimal digits for ``[^\W\d_]``. tests/mmvq/test_text_tokens.py checks that
# both give the same ids on random text of every script.
_PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028"
                  "\u2029\u202f\u205f\u3000")
TOKENIZER_JSON_PRETOKENIZE = (
    rf" ?[\p{{L}}\p{{Nl}}\p{{No}}]+| ?\p{{Nd}}+| ?[^{_PY_WHITESPACE}\p{{L}}\p{{N}}_]+|_+"
    rf"|[{_PY_WHITESPACE}]+(?![^{_PY_WHITESPACE}])|[{_PY_WHITESPACE}]+")
PAD_TOKEN = "<pad>"  # PAD_ID's name in an exported tokenizer.json


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies spell their
    tokens in: printable Latin-1 bytes stand for themselves, the rest for code points 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_TO_UNICODE = _byte_to_unicode()


@runtime_checkable
class TextVocab(Protocol):
    """What the tokenizer and the pipeline need from a text vocabulary."""

    kind: str  # "bytes" or "bpe", as in TextCodecConfig.vocab
    vocab_size: int  # number of ids, PAD included; the text codec's embedding and logit size
    pad_id: int  # the id after a caption's last real id

    @property
    def sha256(self) -> str | None:
        """Content hash of a trained vocabulary; None for the fixed byte vocabulary."""
        ...

    def encode(self, text: str) -> list[int]:
        """``text`` as ids, without padding."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; PAD and ids outside the vocabulary are skipped."""
        ...


# ----------------------------------------------------------------------------- bytes


@dataclass(frozen=True)
class ByteVocab:
    """UTF-8 bytes as ids 0..255, PAD 256."""

    kind: Literal["bytes"] = "bytes"
    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD_ID

    @property
    def sha256(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Invalid UTF-8 (a multi-byte character cut by truncation, or a model's guess) becomes
        # U+FFFD instead of raising: decoding predictions must never fail.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


BYTES = ByteVocab()


# ----------------------------------------------------------------------------- byte-level BPE


@dataclass(frozen=True)
class BpeVocab:
    """A trained byte-level BPE: the 256 byte ids, PAD, then one id per merge.

    Build one with :func:`train_bpe` or :meth:`load`; ``merges[i] = (a, b)`` means ids ``a`` and
    ``b`` next to each other inside a pre-token become id ``FIRST_MERGE_ID + i``.
    """

    merges: tuple[tuple[int, int], ...]
    # How it was trained (requested size, minimum pair count, number of texts); part of the hash
    # so that two vocabularies that happen to agree but came from different settings differ.
    training: dict[str, Any] = field(default_factory=dict, compare=False)
    kind: Literal["bpe"] = "bpe"
    pad_id: int = PAD_ID
    _ranks: dict[tuple[int, int], int] = field(init=False, repr=False, compare=False)
    _bytes: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _cache: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = [bytes([b]) for b in range(256)] + [b""]  # PAD decodes to nothing
        for i, (a, b) in enumerate(self.merges):
            new = FIRST_MERGE_ID + i
            if not (0 <= a < new and 0 <= b < new) or PAD_ID in (a, b):
                raise ValueError(f"BPE merge {i} ({a}, {b}) refers to an id that is not a byte "
                                 f"or an earlier merge")
            table.append(table[a] + table[b])
        object.__setattr__(self, "_ranks", {pair: i for i, pair in enumerate(self.merges)})
        object.__setattr__(self, "_bytes", tuple(table))
        object.__setattr__(self, "_cache", {})

    @property
    def vocab_size(self) -> int:
        return FIRST_MERGE_ID + len(self.merges)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(_canonical(self._payload())).hexdigest()

    def token_bytes(self, token: int) -> bytes:
        """The bytes id ``token`` stands for (empty for PAD)."""
        return self._bytes[token]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in _PRETOKENIZE.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        size = len(self._bytes)
        data = b"".join(self._bytes[int(i)] for i in ids if 0 <= int(i) < size)
        return data.decode("utf-8", errors="replace")

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        word = list(chunk.encode("utf-8"))
        # Apply merges in training order: always the adjacent pair that was learned first, as
        # training would have merged it before any later pair (GPT-2's encoder).
        while len(word) > 1:
            rank, pair = min((self._ranks.get(p, len(self._ranks)), p)
                             for p in pairwise(word))
            if rank == len(self._ranks):
                break
            word = _merge(word, pair, FIRST_MERGE_ID + rank)
        result = tuple(word)
        if len(self._cache) < 100_000:  # captions repeat words; bound the memory anyway
            self._cache[chunk] = result
        return result

    # -- persistence ---------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {"format": BPE_FORMAT, "version": BPE_VERSION, "pad_id": self.pad_id,
                "vocab_size": self.vocab_size, "pretokenizer": PRETOKENIZE_PATTERN,
                "training": dict(self.training), "merges": [list(m) for m in self.merges]}

    def to_json(self) -> str:
        """The vocabulary file's text: the payload plus its ``sha256``."""
        return json.dumps({**self._payload(), "sha256": self.sha256}, indent=1,
                          sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BpeVocab:
        """Read a vocabulary written by :meth:`save`, checking its format, version and sha256.

        Raises
        ------
        ValueError
            Naming ``path``: a missing or unparsable file, another format or version, another
            pre-tokenizer, a sha256 that does not match the content, or invalid merges.
        """
        path = Path(path)
        data = _read_vocab_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: Any) -> BpeVocab:
        """Rebuild a vocabulary from the parsed JSON of :meth:`to_json`, strictly."""
        if not isinstance(data, dict):  # ValueError, not TypeError: it is bad file content
            raise ValueError("text vocabulary must be a JSON object")  # noqa: TRY004
        if data.get("format") != BPE_FORMAT or data.get("version") != BPE_VERSION:
            raise ValueError(f"text vocabulary format {data.get('format')!r} version "
                             f"{data.get('version')!r}; this code reads {BPE_FORMAT!r} version "
                             f"{BPE_VERSION}")
        if data.get("pretokenizer") != PRETOKENIZE_PATTERN:
            raise ValueError("text vocabulary was trained with another pre-tokenizer pattern")
        if data.get("pad_id") != PAD_ID:
            raise ValueError(f"text vocabulary pad_id {data.get('pad_id')!r}, expected {PAD_ID}")
        merges = data.get("merges")
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
                for m in merges):
            raise ValueError("text vocabulary merges must be a list of [int, int] pairs")
        vocab = cls(tuple((a, b) for a, b in merges), training=dict(data.get("training", {})))
        if data.get("vocab_size") != vocab.vocab_size:
            raise ValueError(f"text vocabulary vocab_size {data.get('vocab_size')!r} does not "
                             f"match its {len(merges)} merges ({vocab.vocab_size} ids)")
        if data.get("sha256") != vocab.sha256:
            raise ValueError(f"text vocabulary sha256 {data.get('sha256')!r} does not match its "
                             f"content ({vocab.sha256}): the file was edited or corrupted")
        return vocab

    # -- Hugging Face tokenizers -----------------------------------------------------------------

    def to_tokenizer_json(self) -> str:
        """This vocabulary as a Hugging Face ``tokenizer.json``: ``tokenizers.Tokenizer`` loads
        it and encodes every string to the same ids as :meth:`encode` (PAD is the special token
        ``<pad>``), so a language model's data loader can use it in place of this module.

        Raises
        ------
        ValueError
            If two merges spell the same bytes (a vocabulary file maps each string to one id).
        """
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        table = [_BYTE_TO_UNICODE[b] for b in range(256)] + [PAD_TOKEN]
        vocab = {token: i for i, token in enumerate(table)}
        merges = []
        for i, (a, b) in enumerate(self.merges):
            token = table[a] + table[b]
            if token in vocab:
                raise ValueError(f"BPE merge {i} spells the same bytes as id {vocab[token]} "
                                 f"({self.token_bytes(vocab[token])!r}): a tokenizer.json "
                                 "cannot hold both")
            table.append(token)
            vocab[token] = FIRST_MERGE_ID + i
            merges.append((table[a], table[b]))
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(TOKENIZER_JSON_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([PAD_TOKEN])
        return tokenizer.to_str(pretty=True)

    def save_tokenizer_json(self, path: str | Path) -> None:
        """Write :meth:`to_tokenizer_json` to ``path``."""
        Path(path).write_text(self.to_tokenizer_json(), encoding="utf-8")


def _read_vocab_json(path: Path) -> Any:
    """The parsed JSON of a vocabulary file; ValueError naming ``path`` if missing or not JSON."""
    if not path.is_file():
        raise ValueError(f"{path}: no text vocabulary file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: text vocabulary is not valid JSON ({err})") from err


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _merge(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """``word`` with every non-overlapping occurrence of ``pair``, left to right, as ``new``."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def pretoken_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-token (the unit BPE merges stay inside) occurs in ``texts``.

    Counts from parts of a corpus add up (``Counter.update``), so a large corpus can be counted
    in parallel and trained on with :func:`train_bpe_from_counts`.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_PRETOKENIZE.findall(text))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int, min_pair_count: int = 2) -> BpeVocab:
    """Learn a byte-level BPE with at most ``vocab_size`` ids (bytes, PAD and merges).

    Deterministic: the result depends only on the multiset of texts, not their order. Each step
    merges the adjacent pair of ids with the highest count over all pre-tokens (weighted by how
    often the pre-token occurs); ties go to the numerically smallest pair ``(a, b)``. Training
    stops early when no pair occurs ``min_pair_count`` times, so a small corpus can give fewer
    ids than asked for.

    Parameters
    ----------
    texts : iterable of str
        The training corpus (e.g. the train split's captions).
    vocab_size : int
        Target number of ids, ``> 257``.
    min_pair_count : int
        A pair seen fewer times than this is not worth an id.

    Returns
    -------
    BpeVocab
    """
    texts = list(texts)
    return train_bpe_from_counts(pretoken_counts(texts), vocab_size, min_pair_count,
                                 num_texts=len(texts))


def train_bpe_from_counts(counts: Mapping[str, int], vocab_size: int, min_pair_count: int = 2,
                          num_texts: int | None = None) -> BpeVocab:
    """:func:`train_bpe` from pre-token counts (:func:`pretoken_counts`) instead of texts.

    ``num_texts`` is recorded in the vocabulary's training metadata only.
    """
    if vocab_size <= VOCAB_SIZE:
        raise ValueError(f"BPE vocab_size must exceed the {VOCAB_SIZE} byte ids, got {vocab_size}")
    if min_pair_count < 1:
        raise ValueError(f"min_pair_count must be >= 1, got {min_pair_count}")
    # Sorted so that word indices, and with them every later step, do not depend on text order.
    items = sorted((chunk, int(n)) for chunk, n in counts.items() if n > 0)
    words = [list(chunk.encode("utf-8")) for chunk, _ in items]
    merges = _learn_merges(words, [n for _, n in items], vocab_size - FIRST_MERGE_ID,
                           min_pair_count)
    training = {"requested_vocab_size": vocab_size, "min_pair_count": min_pair_count,
                "num_texts": num_texts}
    return BpeVocab(tuple(merges), training=training)


def _learn_merges(words: list[list[int]], counts: list[int], num_merges: int,
                  min_pair_count: int) -> list[tuple[int, int]]:
    """The merge loop with incremental pair counts: only words holding the merged pair change.

    A heap of ``(-count, pair)`` gives the best pair; entries go stale when a count changes and
    are skipped when popped (their count no longer matches).
    """
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(index)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_pair_count:
            break
        new = FIRST_MERGE_ID + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for index in sorted(where.pop(pair, ())):
            word, count = words[index], counts[index]
            for old in pairwise(word):
                pair_counts[old] -= count
                changed.add(old)
            word = words[index] = _merge(word, pair, new)
            for fresh in pairwise(word):
                pair_counts[fresh] += count
                where.setdefault(fresh, set()).add(index)
                changed.add(fresh)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
    return merges


# ----------------------------------------------------------------------------- tokenizer.json


class TokenizerJsonVocab:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library) as a text
    vocabulary, for text tokens that match the language model a user will train.

    Ids are the tokenizer's own, without special tokens added; :meth:`decode` keeps every id.
    ``sha256`` is the file's, so a token dataset names exactly the tokenizer it was made with.
    Only a tokenizer that gives every string back (byte-level BPE, as GPT-2, Llama 3 and
    Qwen use) keeps text tokens lossless: :func:`check_lossless` says when one does not.
    """

    kind = "tokenizer.json"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        data = self.path.read_bytes()
        try:
            self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises its own Exception type on bad files
            raise ValueError(f"{self.path}: not a tokenizer.json that the tokenizers library "
                             f"loads ({err})") from err
        self._sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        pad = self._tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id = self.vocab_size if pad is None else pad

    @property
    def sha256(self) -> str:
        return self._sha256

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_text_vocab(path: str | Path) -> TextVocab:
    """A vocabulary file: our BPE's ``text_vocab.json`` or a Hugging Face ``tokenizer.json``.

    Raises
    ------
    ValueError
        Naming ``path`` when it is missing or neither kind.
    """
    path = Path(path)
    data = _read_vocab_json(path)
    if isinstance(data, dict) and data.get("format") == BPE_FORMAT:
        return BpeVocab.load(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return TokenizerJsonVocab(path)
    raise ValueError(f"{path}: neither an mmvq BPE vocabulary ({VOCAB_FILE}) nor a Hugging Face "
                     "tokenizer.json")


# Strings a lossless vocabulary must give back; a tokenizer that lower-cases, strips accents
# or spaces, or maps characters to <unk> fails on one of them.
_LOSSLESS_PROBES = ("A Red Circle, 3 dots!", "  two  spaces\tand a tab\n", "caf\u00e9 na\u0308ive",
                    "\u8272\u5f69 \U0001f3a8 \u05e9\u05dc\u05d5\u05dd", "\x00\x07\x1b ctl")


def check_lossless(vocab: TextVocab, where: str) -> None:
    """Raise ValueError (naming ``where``) unless ``vocab`` gives back a few demanding strings
    exactly: text tokens must decode to the caption they came from."""
    for text in _LOSSLESS_PROBES:
        back = vocab.decode(vocab.encode(text))
        if back != text:
            raise ValueError(f"{where}: the text vocabulary is lossy: {text!r} comes back as "
                             f"{back!r}; text tokens need one that keeps every string (a "
                             "byte-level BPE such as GPT-2's, or text_tokens: bytes)")


# ----------------------------------------------------------------------------- fixed-length ids


def encode_text(text: str, max_len: int, vocab: TextVocab = BYTES) -> tuple[np.ndarray, int]:
    """Encode ``text`` with ``vocab``, truncated and padded to ``max_len`` ids.

    Parameters
    ----------
    text : str
        Any Unicode string that UTF-8 can encode.
    max_len : int
        Length of the returned id array.
    vocab : TextVocab
        Byte-level by default.

    Returns
    -------
    ids : np.ndarray
        int32 array of shape ``(max_len,)``; positions ``>= length`` hold ``vocab.pad_id``.
    length : int
        Number of real (non-pad) ids, ``min(len(vocab.encode(text)), max_len)``.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    encoded = vocab.encode(text)[:max_len]
    ids = np.full((max_len,), vocab.pad_id, dtype=np.int32)
    ids[: len(encoded)] = encoded
    return ids, len(encoded)


def decode_ids(ids: Sequence[int] | np.ndarray, length: int, vocab: TextVocab = BYTES) -> str:
    """Decode the first ``length`` ids back to text with ``vocab``.

    PAD and ids outside the vocabulary (anything a model predicts there) are skipped, and invalid
    UTF-8 (e.g. a multi-byte character cut by truncation) becomes U+FFFD instead of raising.
    """
    head = np.asarray(ids).reshape(-1)[: max(int(length), 0)].astype(np.int64)
    return vocab.decode(head.tolist())


# ----------------------------------------------------------------------------- text config


def text_config_for(cfg: TextCodecConfig, vocab: TextVocab) -> TextCodecConfig:
    """``cfg`` with its ``vocab``, ``vocab_size`` and ``vocab_sha256`` describing ``vocab``."""
    return replace(cfg, vocab=vocab.kind, vocab_size=vocab.vocab_size, vocab_sha256=vocab.sha256)


def check_vocab_matches(cfg: TextCodecConfig, vocab: TextVocab, where: str) -> None:
    """Raise ConfigError (naming ``where``) unless ``vocab`` is the one ``cfg`` describes."""
    have = (vocab.kind, vocab.vocab_size, vocab.sha256)
    want = (cfg.vocab, cfg.vocab_size, cfg.vocab_sha256)
    if have != want:
        raise ConfigError(
            f"{where}: text vocabulary (kind, vocab_size, sha256) = {have} does not match the "
            f"text config's (vocab, vocab_size, vocab_sha256) = {want}"
        )


# ----------------------------------------------------------------------------- checkpoints


def vocab_for_config(cfg: TextCodecConfig, vocab: TextVocab | None) -> TextVocab:
    """The vocabulary a text codec built from ``cfg`` uses: ``vocab``, checked against ``cfg``,
    or the byte vocabulary when ``cfg.vocab`` is ``bytes`` and none is given."""
    if vocab is None:
        if cfg.vocab != "bytes":
            raise ValueError(f"text.vocab is {cfg.vocab!r}: pass the trained vocabulary "
                             f"(text_vocab=BpeVocab.load(...)) with the config")
        return BYTES
    check_vocab_matches(cfg, vocab, "text_vocab")
    return vocab


def write_checkpoint_vocab(vocab: TextVocab, directory: str | Path) -> None:
    """Write ``directory/text_vocab.json`` for a trained vocabulary (none for bytes; a stale
    one from an earlier save is removed so the directory holds one consistent checkpoint)."""
    path = Path(directory) / VOCAB_FILE
    if isinstance(vocab, BpeVocab):
        vocab.save(path)
    else:
        path.unlink(missing_ok=True)


def read_checkpoint_vocab(cfg: TextCodecConfig, directory: str | Path) -> TextVocab:
    """The vocabulary of a checkpoint in ``directory`` whose text config is ``cfg``.

    Raises
    ------
    ValueError
        Naming ``directory/text_vocab.json`` when ``cfg`` needs it and it is missing, corrupt
        (its sha256 no longer matches its content) or another vocabulary than ``cfg`` records.
    """
    if cfg.vocab == "bytes":
        return BYTES
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; the checkpoint's text.vocab is {cfg.vocab!r} and "
                         f"needs its vocabulary file")
    vocab = BpeVocab.load(path)
    if vocab.sha256 != cfg.vocab_sha256 or vocab.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path}: vocabulary sha256 {vocab.sha256} ({vocab.vocab_size} ids) "
                         f"is not the one config.json records, text.vocab_sha256 "
                         f"{cfg.vocab_sha256} ({cfg.vocab_size} ids)")
    return vocab
