"""Quantizers, one module per family; ``QUANTIZERS`` maps each kind to its builder.

``build_quantizer`` makes one from a :class:`~mmvq.config.QuantizerConfig`, which is how the
tokenizer builds its three.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from mmvq.config import QuantizerConfig
from mmvq.config_io import ConfigError
from mmvq.quantizers.base import QuantizerOutput
from mmvq.quantizers.distance import nearest_code
from mmvq.quantizers.fsq import FSQ
from mmvq.quantizers.lfq import LFQ
from mmvq.quantizers.rvq import ResidualVQ
from mmvq.quantizers.simvq import SimVQ
from mmvq.quantizers.vq import VectorQuantizer

_LOOKUP = ("l2_normalize", "code_dim", "rotation_trick")
_CODEBOOK = ("ema", "decay", "eps", "kmeans_init", "kmeans_iters", "restart_threshold")
# QuantizerConfig fields that each kind reads besides ``kind`` and ``l2_normalize`` (whose default,
# True, is the cosine lookup of vq/simvq; the other kinds have no such lookup and ignore it).
# Setting any other field away from its default is an error rather than silently ignored.
APPLICABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "vq": _LOOKUP + _CODEBOOK,
    "simvq": _LOOKUP,
    "rvq": ("code_dim", "rotation_trick", *_CODEBOOK, "num_levels", "quantizer_dropout"),
    "fsq": ("fsq_levels",),
    "lfq": ("entropy_weight",),
}


def _lookup_options(config: QuantizerConfig) -> dict[str, Any]:
    return {"code_dim": config.code_dim, "rotation_trick": config.rotation_trick}


def _codebook_options(config: QuantizerConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in _CODEBOOK}


def _build_vq(config: QuantizerConfig, codebook_size: int, dim: int) -> VectorQuantizer:
    return VectorQuantizer(codebook_size, dim, config.l2_normalize, **_lookup_options(config),
                           **_codebook_options(config))


def _build_simvq(config: QuantizerConfig, codebook_size: int, dim: int) -> SimVQ:
    return SimVQ(codebook_size, dim, config.l2_normalize, **_lookup_options(config))


def _build_rvq(config: QuantizerConfig, codebook_size: int, dim: int) -> ResidualVQ:
    # No l2_normalize: its default is the vq/simvq cosine lookup, and residuals are not unit
    # vectors, so the levels keep ResidualVQ's raw-L2 default.
    return ResidualVQ(codebook_size, dim, num_levels=config.num_levels,
                      quantizer_dropout=config.quantizer_dropout, **_lookup_options(config),
                      **_codebook_options(config))


def _build_fsq(config: QuantizerConfig, codebook_size: int, dim: int) -> FSQ:
    fsq = FSQ(dim, config.fsq_levels)
    if fsq.codebook_size != codebook_size:
        raise ConfigError(f"quantizer.fsq_levels {config.fsq_levels} give {fsq.codebook_size} "
                          f"codes, but the modality's codebook_size is {codebook_size}")
    return fsq


def _build_lfq(config: QuantizerConfig, codebook_size: int, dim: int) -> LFQ:
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ConfigError(f"quantizer.kind 'lfq' needs a power-of-two codebook_size, got "
                          f"{codebook_size}")
    return LFQ(codebook_size, dim, entropy_weight=config.entropy_weight)


# A builder makes the quantizer of its kind from (config, codebook_size, dim).
QuantizerBuilder = Callable[[QuantizerConfig, int, int], nn.Module]
# The value of ``QuantizerConfig.kind`` -> its builder.
QUANTIZERS: dict[str, QuantizerBuilder] = {
    "vq": _build_vq,
    "simvq": _build_simvq,
    "rvq": _build_rvq,
    "fsq": _build_fsq,
    "lfq": _build_lfq,
}


def build_quantizer(config: QuantizerConfig, codebook_size: int, dim: int) -> nn.Module:
    """The quantizer ``config.kind`` for ``codebook_size`` codes of width ``dim``.

    Raises
    ------
    ValueError
        For an unknown kind; :class:`~mmvq.config_io.ConfigError` (a ValueError) for a setting
        the kind does not use, or a codebook size it cannot have (FSQ: prod(fsq_levels); LFQ: a
        power of two).
    """
    builder = QUANTIZERS.get(config.kind)
    if builder is None:
        raise ValueError(f"unknown quantizer.kind {config.kind!r}; known: {sorted(QUANTIZERS)}")
    _check_applicable(config)
    return builder(config, codebook_size, dim)


def _check_applicable(config: QuantizerConfig) -> None:
    defaults = QuantizerConfig()
    used = set(APPLICABLE_FIELDS[config.kind]) | {"kind", "l2_normalize"}
    for f in dataclasses.fields(config):
        if f.name not in used and getattr(config, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"quantizer.{f.name} does not apply to kind {config.kind!r}; "
                              f"it uses {sorted(APPLICABLE_FIELDS[config.kind])}")


__all__ = [
    "APPLICABLE_FIELDS",
    "FSQ",
    "LFQ",
    "QUANTIZERS",
    "QuantizerBuilder",
    "QuantizerOutput",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantizer",
    "build_quantizer",
    "nearest_code",
]
