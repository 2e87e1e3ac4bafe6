"""rFID: the Fréchet Inception distance between a split's images and their reconstructions.

The number tokenizer papers report (VQGAN, LlamaGen, TiTok): Inception-v3's 2048-d pool
features of the originals and of the decodes are each summarised by a mean and a covariance,
and the distance of the two Gaussians is ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
Lower is better; 0 means the reconstructions are, to Inception, distributed as the originals.

The feature extractor and the distance are torch-fidelity's (the TF-ported Inception with
TF1-compatible resizing that FID numbers are comparable by); what is ours is streaming: the
statistics are sums over batches, so a split of any size is scored in bounded memory, and the
originals' features are computed once for every model compared against them.

Weights come only from local files: ``evaluate.inception_weights``, else torch's hub cache
(``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
torch-fidelity's own download puts them). Nothing is downloaded; with no file the metric is
skipped and the caller says so. The file is loaded as a plain state dict (``weights_only``):
a weights file a user received cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mmvq.modalities.image import to_pixels

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = "2048"  # the pool3 features FID is defined on


class InceptionWeightsError(ValueError):
    """A weights file that is not an Inception-v3 state dict torch-fidelity can load."""


def hub_inception_path(hub_dir: str | Path | None = None) -> Path:
    """Where torch's hub cache keeps torch-fidelity's Inception weights."""
    return Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints" / \
        INCEPTION_FILE


def find_inception_weights(path: str | Path | None,
                           hub_dir: str | Path | None = None) -> tuple[Path | None, str]:
    """The weights file to use and, when there is none, why: ``(path, "")`` or ``(None,
    reason)``. A configured ``path`` wins; unset, the hub cache is looked in."""
    if path is not None:
        return (Path(path), "") if Path(path).is_file() else (
            None, f"no Inception weights file at {path}")
    cached = hub_inception_path(hub_dir)
    if cached.is_file():
        return cached, ""
    return None, (f"evaluate.inception_weights is not set and there is no {cached}; "
                  "weights are never downloaded")


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch-fidelity loads its file with ``weights_only=False``; torch's own switch makes that
    call load tensors only, so a pickle in the file cannot run code."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_inception(path: str | Path) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 feature extractor with the weights in ``path``: uint8
    (B, 3, H, W) -> ((B, 2048),). Raises :class:`InceptionWeightsError` naming the file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        with _weights_only_loads():
            return FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES],
                                               feature_extractor_weights_path=str(path))
    except Exception as error:  # unpickling refused, missing keys, wrong shapes, not a file
        raise InceptionWeightsError(
            f"{path}: not torch-fidelity's Inception-v3 weights as a plain state dict "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from error


class FeatureStatistics:
    """Running sum and sum of outer products of feature rows (float64): mean and covariance
    of any number of rows in O(D^2) memory."""

    def __init__(self) -> None:
        self.count = 0
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        rows = np.asarray(features, dtype=np.float64)
        if self.total is None:
            self.total = np.zeros(rows.shape[1])
            self.outer = np.zeros((rows.shape[1], rows.shape[1]))
        self.count += len(rows)
        self.total += rows.sum(axis=0)
        self.outer += rows.T @ rows

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """As ``np.mean`` and ``np.cov`` (unbiased, N - 1) of all rows added."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID of two feature sets, by torch-fidelity's formula (eigenvalues of S1 S2: defined
    for the singular covariances of fewer samples than features)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    (mu1, sigma1), (mu2, sigma2) = a.mean_and_covariance(), b.mean_and_covariance()
    stats = ({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2})
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


class ReconstructionFID:
    """rFID of several models' reconstructions against the same originals.

    Parameters
    ----------
    extractor : :func:`load_inception`'s module
    models : the names scored, e.g. ``("trained", "untrained")``
    """

    def __init__(self, extractor: torch.nn.Module, models: Iterable[str]) -> None:
        self.extractor = extractor
        self.reference = FeatureStatistics()
        self.models = {name: FeatureStatistics() for name in models}

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> np.ndarray:
        device = next(self.extractor.parameters()).device
        (features,) = self.extractor(to_pixels(images).to(device))
        return features.double().cpu().numpy()

    def add(self, originals: torch.Tensor, reconstructions: dict[str, torch.Tensor]) -> None:
        """One batch: the original images and each model's reconstructions of them, all
        (B, 3, H, W) in [-1, 1] (only the samples that have an image)."""
        if len(originals) == 0:
            return
        self.reference.add(self._features(originals))
        for name, images in reconstructions.items():
            self.models[name].add(self._features(images))

    def distances(self) -> dict[str, float]:
        """Model name -> rFID; empty with fewer than two images."""
        if self.reference.count < 2:
            return {}
        return {name: frechet_distance(self.reference, stats)
                for name, stats in self.models.items()}
