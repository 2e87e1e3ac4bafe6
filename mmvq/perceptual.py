"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, as taming-transformers uses it.

Both images go through VGG16's conv layers; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the
features are unit-normalised along channels, their squared difference is weighted per channel by
a learned 1x1 "linear head", averaged over space and summed over the five layers.

Weights come only from local files (``GanConfig.perceptual_weights_path``, else torch's hub cache:
:func:`find_lpips_weights`); nothing is ever downloaded. The file is a plain state dict, either this module's own (``features.*``,
``lins.*``) or the reference keys, which are renamed on load: torchvision's VGG16
(``features.*``; ``classifier.*`` is ignored) merged with the LPIPS heads of richzhang's
``vgg.pth`` or taming's ``vgg_lpips`` (``lin0.model.1.weight`` ...), e.g.::

    torch.save({**torch.load("vgg16-397923af.pth"), **torch.load("vgg.pth")}, "lpips_vgg.pt")
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Indices into vgg16().features just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """VGG16's conv layers up to relu5_3 (torchvision layout), randomly initialised.

    Built on the meta device and then materialised: constructing ``vgg16()`` directly also
    initialises its 120M-parameter classifier, 6 s of CPU for weights LPIPS never uses.
    torchvision is imported here, not with the module: every train worker imports this module,
    and most runs build no LPIPS (no weights on disk), so 1.7 s of CPU per worker went to it.
    """
    import torchvision

    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    features = vgg.features[: TAPS[-1]].to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):  # torchvision's own VGG init
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return features


class LPIPS(nn.Module):
    """LPIPS distance per sample; frozen, always in eval mode.

    Constructed directly it has *random* weights (for tests and timing); load trained ones with
    :func:`load_lpips` or :func:`build_perceptual`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        for lin in self.lins:  # trained heads are >= 0 (LPIPS clamps them): a distance
            nn.init.uniform_(lin.weight, 0.0, 1.0 / lin.in_channels)
        # Input normalisation of the reference LPIPS, for images in [-1, 1]; constants, so not in
        # the state dict.
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: a model.train() call on a parent must not change the metric."""
        return super().train(False)

    def _taps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> channel-normalised features at the five taps."""
        h = (image - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i + 1 in TAPS:  # (B, C_k, H_k, W_k); unit norm along C, eps as the reference
                taps.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance per sample: (B, 3, H, W) x2 in [-1, 1] -> (B,); gradients flow to ``image``."""
        with torch.no_grad():  # the target needs no graph: saves half the backward's memory
            target_taps = self._taps(target)
        total = image.new_zeros(image.shape[0])
        for lin, a, b in zip(self.lins, self._taps(image), target_taps):
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))  # (B, 1, h, w) -> (B,)
        return total


# Reference key patterns -> this module's keys. A prefix (e.g. ``loss.perceptual_loss.`` in a
# taming checkpoint) is allowed before each reference key.
_KEY_PATTERNS = (
    (re.compile(r"^features\.(\d+)\.(weight|bias)$"), r"features.\1.\2"),  # ours / torchvision
    (re.compile(r"^lins\.(\d)\.weight$"), r"lins.\1.weight"),  # ours
    (re.compile(r"(?:^|\.)net\.slice\d\.(\d+)\.(weight|bias)$"), r"features.\1.\2"),  # taming
    (re.compile(r"(?:^|\.)lin(\d)\.model\.\d\.weight$"), r"lins.\1.weight"),  # LPIPS, taming
)


def lpips_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference LPIPS/VGG16 keys to :class:`LPIPS` keys; drop every other key.

    Keys past ``relu5_3`` (``features.30`` on) and the VGG classifier are dropped; a strict
    ``load_state_dict`` afterwards catches anything missing.
    """
    out = {}
    for key, value in state.items():
        for pattern, replacement in _KEY_PATTERNS:
            match = pattern.search(key)
            if match:
                out[match.expand(replacement)] = value
                break
    return {k: v for k, v in out.items() if not k.startswith("features.") or _in_taps(k)}


def _in_taps(key: str) -> bool:
    return int(key.split(".")[1]) < TAPS[-1]


# What :func:`find_lpips_weights` looks for in torch's hub cache (``torch.hub.get_dir()``/
# checkpoints, where torchvision and taming put downloaded weights): our merged file, or the two
# files it is made of, torchvision's ImageNet VGG16 and the LPIPS v0.1 heads (richzhang's
# ``vgg.pth``, which the ``lpips`` package also ships in ``lpips/weights/v0.1/``).
MERGED_FILE = "lpips_vgg.pt"
VGG16_FILE = "vgg16-397923af.pth"
HEADS_FILE = "vgg.pth"


def find_lpips_weights(hub_dir: str | Path | None = None) -> list[Path]:
    """The local LPIPS weight files in the standard places, or [] when there are none.

    One file (:data:`MERGED_FILE`) or two (:data:`VGG16_FILE` and :data:`HEADS_FILE`), whose
    state dicts together make the weights. Only looks; nothing is ever downloaded.
    """
    import importlib.util

    checkpoints = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    if (checkpoints / MERGED_FILE).is_file():
        return [checkpoints / MERGED_FILE]
    heads = [checkpoints / HEADS_FILE]
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin is not None:  # the lpips package ships the heads
        heads.append(Path(spec.origin).parent / "weights" / "v0.1" / HEADS_FILE)
    found = [h for h in heads if h.is_file()]
    if (checkpoints / VGG16_FILE).is_file() and found:
        return [checkpoints / VGG16_FILE, found[0]]
    return []


def where_lpips_is_looked_for(hub_dir: str | Path | None = None) -> str:
    """One phrase for messages: where :func:`find_lpips_weights` looked."""
    checkpoints = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    return f"{checkpoints}/{MERGED_FILE}, or {VGG16_FILE} with {HEADS_FILE} there"


def load_lpips_files(paths: list[Path]) -> LPIPS:
    """An :class:`LPIPS` from the files :func:`find_lpips_weights` returns (merged in order)."""
    if len(paths) == 1:
        return load_lpips(paths[0])
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    model = LPIPS()
    model.load_state_dict(lpips_state_dict(state), strict=True)
    return model


def load_lpips(path: str | Path) -> LPIPS:
    """An :class:`LPIPS` with the weights in the local file ``path`` (on the CPU).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file; the message names the path.
    RuntimeError
        If the file lacks weights LPIPS needs, or their shapes differ (strict load).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights file not found: {path} (gan.perceptual_weights_path); mmvq never "
            "downloads weights, see mmvq/perceptual.py for how to make this file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = LPIPS()
    model.load_state_dict(lpips_state_dict(state), strict=True)
    return model


def build_perceptual(path: str | Path | None, *, random_weights: bool = False,
                     hub_dir: str | Path | None = None,
                     announce: bool = True) -> LPIPS | None:
    """The perceptual net a run asked for: loaded from ``path``, found in torch's hub cache,
    random, or none.

    Parameters
    ----------
    path : local weights file; None: the standard places (:func:`find_lpips_weights`), and no
        perceptual loss when they hold none, said in one line (printed when ``announce``)
    random_weights : with ``path`` None, build an untrained net instead (timing runs only: a
        random VGG's distance is not perceptual)
    hub_dir : torch's hub directory to look in (default ``torch.hub.get_dir()``)
    """
    if path is not None:
        if random_weights:
            raise ValueError("build_perceptual: give a weights path or random_weights, not both")
        return load_lpips(path)
    if random_weights:
        return LPIPS()
    files = find_lpips_weights(hub_dir)
    if files:
        message = f"perceptual loss on: LPIPS weights from {', '.join(map(str, files))}"
        net = load_lpips_files(files)
    else:
        message = ("perceptual loss off: no LPIPS weights (gan.perceptual_weights_path is not "
                   f"set, and there is no {where_lpips_is_looked_for(hub_dir)}); weights are "
                   "never downloaded")
        net = None
    logger.debug(message)
    if announce:
        # The process's real stdout: in a Ray Train worker a plain print is printed twice.
        print(f"[train] {message}", file=sys.__stdout__, flush=True)
    return net
