"""Random captions of every script, for the text-token tests."""

from __future__ import annotations

import random

# Characters a caption may hold, by kind; random strings draw from several at once.
SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ  red circle",
    "cjk": "色彩图像声音文字日本語のテキスト한국어",
    "emoji": ["😀", "🎨", "🐱\u200d👤", "👩\u200d👩\u200d👧", "🏳️\u200d🌈", "👍🏽"],
    "rtl": "שלום עולם مرحبا بالعالم",
    "combining": ["e\u0301", "a\u0308", "n\u0303", "\u20dd", "\u0338", "o\u0302\u0323"],
    "control": "\x00\x01\x07\x1b\x1c\x1f\x7f\x85\u2028\u200b\ufeff\t\n\r ",
    "digits": "0123456789٣४²Ⅻ½",
    "symbols": "_-.,!?;:'\"()[]{}<>@#$%^&*~`|\\/",
}


def random_strings(n: int, seed: int) -> list[str]:
    """``n`` strings of 1-40 characters mixing the kinds above (each has a visible one)."""
    rng = random.Random(seed)
    kinds = list(SCRIPTS)
    out = []
    for _ in range(n):
        chosen = rng.sample(kinds, rng.randint(1, 4))
        text = "".join(rng.choice(SCRIPTS[rng.choice(chosen)]) for _ in range(rng.randint(1, 40)))
        out.append(text + rng.choice("xé色🎨"))
    return out
