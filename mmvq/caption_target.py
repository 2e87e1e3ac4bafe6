"""A caption as a bag of hashed id n-grams: the fixed target of fusion's caption loss.

InfoNCE between pooled embeddings learns only once both sides are organised, which on the
demo's schedule never happens (BENCHMARKS.md "Why fusion's own heads do not align"). A
per-sample target that exists from the first step does not wait for that: every modality's
pooled quantized latents predict which n-grams of the sample's text ids occur (a bag-of-words
captioning objective, as in VirTex, Desai & Johnson 2021, and the captioning half of CoCa, Yu et
al. 2022, reduced to a multi-label classification so that it needs no decoder). Unigrams say
what is named, bigrams and trigrams what goes with what ("red circle" against "blue circle",
"circle left" against "square left"), which a bag of single words cannot. Hashing into a fixed
number of buckets makes the target independent of the text vocabulary (bytes or BPE: with bytes
the trigrams are word pieces); collisions only merge two n-grams into one label.
"""

from __future__ import annotations

import torch

# Prime multipliers, one per offset in the n-gram, and an offset per n so that a unigram and a
# bigram of the same ids land in different buckets (any distinct large primes would do; ids
# times these stay far inside int64).
_OFFSET_PRIMES = (1_000_003, 2_000_029, 3_000_017)
_ORDER_PRIMES = (7_368_787, 15_485_863, 2_147_483_647)
MAX_NGRAM = len(_OFFSET_PRIMES)


def caption_bag(ids: torch.Tensor, lengths: torch.Tensor, ngrams: int, buckets: int,
                ) -> torch.Tensor:
    """(B, buckets) float multi-hot of the hashed 1..``ngrams``-grams of each caption.

    Parameters
    ----------
    ids : (B, L) long text ids (anything after ``lengths`` is ignored)
    lengths : (B,) long real ids per caption
    ngrams : longest n-gram, 1..MAX_NGRAM
    buckets : width of the bag
    """
    if not 1 <= ngrams <= MAX_NGRAM:
        raise ValueError(f"ngrams must be in 1..{MAX_NGRAM}, got {ngrams}")
    batch, length = ids.shape
    bag = torch.zeros(batch, buckets + 1, device=ids.device)  # the last column: padding
    positions = torch.arange(length, device=ids.device)
    for n in range(1, min(ngrams, length) + 1):
        starts = length - n + 1
        code = torch.full((batch, starts), _ORDER_PRIMES[n - 1], dtype=torch.long,
                          device=ids.device)
        for offset in range(n):
            code = code + ids[:, offset:offset + starts].long() * _OFFSET_PRIMES[offset]
        index = code.remainder(buckets)  # (B, starts)
        valid = positions[None, :starts] + n <= lengths[:, None]  # the whole n-gram is real
        index = torch.where(valid, index, torch.full_like(index, buckets))
        bag.scatter_(1, index, 1.0)
    return bag[:, :buckets]
