"""rFID: our streaming statistics against torch-fidelity's own computation, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from mmvq.fid import (
    FeatureStatistics,
    InceptionWeightsError,
    ReconstructionFID,
    find_inception_weights,
    hub_inception_path,
    load_inception,
)
from mmvq.modalities.image import to_pixels

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def _photos(size: int = 64) -> torch.Tensor:
    """Two crops of each scikit-image colour photo, (12, 3, size, size) in [-1, 1]."""
    crops = []
    for name in PHOTOS:
        image = torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy())
        image = image.permute(2, 0, 1).float() / 127.5 - 1
        side = min(image.shape[1:])
        for crop in (image[:, :side, :side], image[:, :side // 2, :side // 2]):  # all, a corner
            crops.append(F.interpolate(crop[None], size=(size, size), mode="area")[0])
    return torch.stack(crops)


def _distorted(images: torch.Tensor, amount: float) -> torch.Tensor:
    """What a weak tokenizer does: blur plus noise."""
    generator = torch.Generator().manual_seed(1)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return (blurred + amount * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


class _Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) per item: what torch-fidelity's calculate_metrics reads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = to_pixels(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_streaming_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    rows = rng.normal(3.0, 2.0, (50, 7))
    stats = FeatureStatistics()
    for chunk in np.array_split(rows, 4):
        stats.add(chunk)
    mean, covariance = stats.mean_and_covariance()
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        one = FeatureStatistics()
        one.add(rows[:1])
        one.mean_and_covariance()


def test_rfid_matches_torch_fidelity_with_the_same_extractor(inception_weights):
    import torch_fidelity

    originals = _photos()
    mild, strong = _distorted(originals, 0.05), _distorted(originals, 0.4)
    fid = ReconstructionFID(load_inception(inception_weights), ["mild", "strong"])
    for batch in torch.split(torch.arange(len(originals)), 5):  # uneven batches: streaming
        fid.add(originals[batch], {"mild": mild[batch], "strong": strong[batch]})
    ours = fid.distances()
    for name, images in (("mild", mild), ("strong", strong)):
        reference = torch_fidelity.calculate_metrics(
            input1=_Images(originals), input2=_Images(images), fid=True, cuda=False,
            feature_extractor_weights_path=str(inception_weights), batch_size=4,
            verbose=False, cache=False, save_cpu_ram=True)["frechet_inception_distance"]
        assert ours[name] == pytest.approx(reference, rel=1e-4), name
    assert 0 < ours["mild"] < ours["strong"]  # the metric orders the distortions


def test_identical_images_score_zero_and_one_image_scores_nothing(inception_weights):
    originals = _photos()[:4]
    fid = ReconstructionFID(load_inception(inception_weights), ["same"])
    fid.add(originals, {"same": originals.clone()})
    assert fid.distances()["same"] == pytest.approx(0.0, abs=1e-3)
    single = ReconstructionFID(load_inception(inception_weights), ["same"])
    single.add(originals[:1], {"same": originals[:1]})
    assert single.distances() == {}


def test_weights_are_found_locally_and_never_downloaded(tmp_path, inception_weights):
    assert find_inception_weights(inception_weights, hub_dir=tmp_path) == (inception_weights, "")
    path, reason = find_inception_weights(tmp_path / "nope.pth", hub_dir=tmp_path)
    assert path is None and "nope.pth" in reason
    path, reason = find_inception_weights(None, hub_dir=tmp_path)
    assert path is None and str(hub_inception_path(tmp_path)) in reason
    hub_inception_path(tmp_path).parent.mkdir(parents=True)
    hub_inception_path(tmp_path).write_bytes(inception_weights.read_bytes())
    assert find_inception_weights(None, hub_dir=tmp_path) == (hub_inception_path(tmp_path), "")


class _RunsCode:
    """A pickle payload: unpickling it calls Path.touch on the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_weights_file_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    marker = tmp_path / "ran"
    hostile = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(marker)}, hostile)
    # The attack: torch-fidelity's own loader unpickles with weights_only=False.
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(RuntimeError):  # load_state_dict: the value is not a tensor
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                    feature_extractor_weights_path=str(hostile))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InceptionWeightsError, match="inception.pth"):
        load_inception(hostile)
    assert not marker.exists()
    import os
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # put back


def test_wrong_weights_name_the_file(tmp_path):
    wrong = tmp_path / "lpips.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(InceptionWeightsError, match="lpips.pt.*plain state dict"):
        load_inception(wrong)
