"""Quantizers, one module per family; pick one by name from ``QUANTIZERS``."""

from mmvq.quantizers.simvq import SimVQ
from mmvq.quantizers.vq import QuantizerOutput, VectorQuantizer, nearest_code

QUANTIZERS = {"vq": VectorQuantizer, "simvq": SimVQ}

__all__ = ["QUANTIZERS", "QuantizerOutput", "SimVQ", "VectorQuantizer", "nearest_code"]
