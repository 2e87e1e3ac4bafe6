"""Quantizers, one module per family; pick one by name from ``QUANTIZERS``."""

from mmvq.quantizers.vq import QuantizerOutput, VectorQuantizer, nearest_code

QUANTIZERS = {"vq": VectorQuantizer}

__all__ = ["QUANTIZERS", "QuantizerOutput", "VectorQuantizer", "nearest_code"]
