import logging

import pytest
import torch

from mmvq.perceptual import LPIPS, TAPS, build_perceptual, load_lpips, lpips_state_dict


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS()  # random weights: enough for the metric's invariants


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32) * 2 - 1


def test_distance_is_zero_for_identical_images_and_grows_with_the_difference(lpips, images):
    assert torch.equal(lpips(images, images), torch.zeros(2))
    small = lpips(images + 0.05 * torch.randn_like(images), images)
    large = lpips(images + 0.5 * torch.randn_like(images), images)
    assert small.shape == (2,) and (small > 0).all() and (large > small).all()


def test_distance_is_the_reference_lpips_formula(lpips, images):
    # taming's LPIPS.forward: VGG slices, normalize_tensor, squared difference, linear head,
    # spatial average, sum over the five layers.
    def taps(x):
        h, out, start = (x - lpips.shift) / lpips.scale, [], 0
        for end in TAPS:
            h = lpips.features[start:end](h)
            out.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + 1e-10))
            start = end
        return out

    other = images.flip(0)
    expected = sum(
        lin((a - b) ** 2).mean(dim=(2, 3)).squeeze(1)
        for lin, a, b in zip(lpips.lins, taps(images), taps(other))
    )
    torch.testing.assert_close(lpips(images, other), expected)


def test_gradient_reaches_the_image_but_not_the_frozen_net(lpips, images):
    x = (images + 0.1).requires_grad_()
    lpips(x, images).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())


def test_parent_train_mode_leaves_lpips_in_eval():
    parent = torch.nn.ModuleDict({"lpips": LPIPS()})
    parent.train()
    assert not parent["lpips"].training


def test_saved_weights_load_back_exactly(lpips, images, tmp_path):
    path = tmp_path / "lpips.pt"
    torch.save(lpips.state_dict(), path)
    loaded = load_lpips(path)
    torch.testing.assert_close(loaded(images, images.flip(0)), lpips(images, images.flip(0)))


def _reference_keys(model: LPIPS) -> dict[str, torch.Tensor]:
    """The model's weights under taming's LPIPS keys, with a checkpoint prefix and extras."""
    slice_of = {i: 1 + sum(i >= t for t in TAPS) for i in range(TAPS[-1])}  # layer -> slice
    state = {"loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    for key, value in model.state_dict().items():
        kind, index, name = key.split(".")
        if kind == "features":
            new = f"net.slice{slice_of[int(index)]}.{index}.{name}"
        else:
            new = f"lin{index}.model.1.{name}"
        state[f"loss.perceptual_loss.{new}"] = value
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a torchvision VGG16 key: ignored
    return state


def test_reference_lpips_keys_are_renamed_on_load(lpips, images, tmp_path):
    path = tmp_path / "taming_lpips.pt"
    torch.save(_reference_keys(lpips), path)
    assert set(lpips_state_dict(torch.load(path))) == set(lpips.state_dict())
    loaded = load_lpips(path)
    torch.testing.assert_close(loaded(images, -images), lpips(images, -images))


def test_missing_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "vgg_lpips.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_lpips(path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_perceptual(path)


def test_file_missing_some_weights_is_rejected(lpips, tmp_path):
    state = {k: v for k, v in lpips.state_dict().items() if not k.startswith("lins.4")}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="lins.4.weight"):
        load_lpips(tmp_path / "partial.pt")


def test_no_path_turns_the_loss_off_with_one_log_line(caplog, tmp_path):
    with caplog.at_level(logging.DEBUG, logger="mmvq.perceptual"):
        assert build_perceptual(None, hub_dir=tmp_path, announce=False) is None
    assert len(caplog.records) == 1 and "perceptual loss off" in caplog.records[0].message
    assert isinstance(build_perceptual(None, random_weights=True), LPIPS)
    with pytest.raises(ValueError, match="not both"):
        build_perceptual("x.pt", random_weights=True)


def test_weights_in_the_hub_cache_are_found_and_their_absence_said_once(tmp_path, capfd):
    """gan.perceptual_weights_path unset: torch's hub cache is looked in (never the network),
    for our merged file or torchvision's VGG16 with LPIPS's heads; none: one line, no loss."""
    from mmvq.perceptual import HEADS_FILE, MERGED_FILE, VGG16_FILE

    assert build_perceptual(None, hub_dir=tmp_path) is None
    assert capfd.readouterr().out.count("perceptual loss off: no LPIPS weights") == 1
    torch.manual_seed(0)
    reference = LPIPS()
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    # The two reference files: torchvision's features and richzhang's heads (lin{k}.model.1).
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("features.")},
               checkpoints / VGG16_FILE)
    torch.save({f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(reference.lins)},
               checkpoints / HEADS_FILE)
    pair = build_perceptual(None, hub_dir=tmp_path)
    assert "perceptual loss on" in capfd.readouterr().out
    image, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(pair(image, target), reference(image, target))
    torch.save(reference.state_dict(), checkpoints / MERGED_FILE)  # the merged file wins
    (checkpoints / HEADS_FILE).unlink()
    merged = build_perceptual(None, hub_dir=tmp_path, announce=False)
    assert torch.allclose(merged(image, target), reference(image, target))
    assert capfd.readouterr().out == ""
