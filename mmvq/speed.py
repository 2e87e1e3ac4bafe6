"""The fast training and tokenization path, one switch per optimisation.

:func:`apply_speed` takes a built tokenizer (and, for GAN training, its discriminators, the
perceptual net and the optimizers) and turns on what :class:`SpeedConfig` asks for. It is the one
fast path: the train worker (``pipeline.train_loop.build_parts``, which the GPU benchmark
``pipeline.bench.gpu`` builds its variants with) and the tokenize stage's encoder
(``pipeline.formats.tokens.TokenEncoder``) both go through it, each with its stage's ``speed``
config section.

- **bf16 autocast** around the tokenizer's encoder and decoder nets (image, audio, text), the
  discriminators and LPIPS only. Their outputs are cast back to fp32, so the quantizer, the
  fusion module, the losses and the adaptive weight see fp32 tensors; the quantizers also force
  fp32 themselves (``mmvq/quantizers``). The train and encode steps therefore run without an
  autocast of their own.
- **TF32** for the fp32 matrix products and convolutions that remain, and cuDNN's autotuner.
- **channels_last** (NHWC) weights and inputs of those nets (4-D tensors only: the image nets).
  ``../shared/BENCHMARKS.md``: alone it slowed the eager GroupNorm model on an H200, so by
  default it goes with compile only.
- **torch.compile** of those nets (fuses the GroupNorm/SiLU/cast chains between convs).
- **fused AdamW/Adam** steps (one kernel over all parameters).
- **larger distance blocks** in the quantizers' nearest-code search, so a GPU runs one large
  matrix product instead of dozens of small launches.

Attention already goes through ``scaled_dot_product_attention`` (``mmvq/modalities/image.py``),
which takes the flash or memory-efficient kernel for bf16 inputs; nothing to switch.

Switches apply only on the device types in ``SpeedConfig.device_types`` (the GPU by default):
the CPU demo keeps the plain fp32 eager path. Module state dicts are unchanged (the fast
forward is an instance attribute, compile is ``nn.Module.compile``), so checkpoints written by a
sped-up model load into a plain one.

Typical wiring (before the first optimizer step, before wrapping in DDP)::

    g_opt, d_opt = apply_speed(SpeedConfig(), device, model, discriminators=discs,
                               perceptual=lpips, optimizers=[g_opt, d_opt])
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmvq.config import DEVICE_TYPES, SpeedConfig
from mmvq.config_io import from_dict

# Tokenizer submodules sped up: the modality nets, which carry almost all of the compute. The
# quantizers stay eager fp32 (data-dependent codebook maintenance would only break graphs), and
# so does the small fusion module. The audio decoder has no ``last_layer`` and is compiled whole:
# the adaptive weight's two gradients at its output Linear rerun its (small) backward.
TOKENIZER_TARGETS = ("image_encoder", "image_decoder", "audio_encoder", "audio_decoder",
                     "text_encoder", "text_decoder")
def speed_config_from_dict(data: Mapping[str, Any] | None) -> SpeedConfig:
    """A :class:`SpeedConfig` from plain data, strictly (unknown keys are a ConfigError)."""
    return from_dict(SpeedConfig, data, "speed")


# -- global backend flags ------------------------------------------------------------------------


def set_backend_flags(config: SpeedConfig) -> None:
    """Set TF32 and cuDNN autotuning process-wide, on or off as ``config`` says.

    Both directions are set explicitly: PyTorch enables TF32 convolutions by default, which the
    fp32 baseline must not have. The legacy setters are used on purpose: torch 2.11 raises when
    the legacy getters (still read by Inductor) meet flags set through ``fp32_precision``.
    """
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = config.tf32
    torch.backends.cudnn.benchmark = config.cudnn_benchmark


# -- modules -------------------------------------------------------------------------------------


class FastForward:
    """A module's forward under bf16 autocast (and/or with NHWC inputs), outputs back in fp32.

    Installed as the module's ``forward`` instance attribute, so ``nn.Module.__call__`` (hooks,
    DDP, compile) still goes through it and the state dict is unchanged.
    """

    def __init__(self, module: nn.Module, device_type: str, bf16: bool,
                 channels_last: bool) -> None:
        self.module = module
        self.device_type = device_type
        self.bf16 = bf16
        self.channels_last = channels_last

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:
            args = tuple(_nhwc(a) for a in args)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = type(self.module).forward(self.module, *args, **kwargs)
        return _to_fp32(out)


def _nhwc(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _to_fp32(out: Any) -> Any:
    """Floating tensors below fp32 in ``out`` (a tensor, list, tuple or dict) cast to fp32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float64 else out
    if isinstance(out, list | tuple):
        return type(out)(_to_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_fp32(v) for k, v in out.items()}
    return out


def speed_up_module(module: nn.Module, config: SpeedConfig, device_type: str) -> nn.Module:
    """Apply the module-level switches of ``config`` to ``module`` in place; returns it.

    A module with a ``last_layer`` (the image decoders) is compiled child by child, leaving out
    the child that holds that layer: the adaptive GAN weight takes ``autograd.grad`` at the last
    layer twice per step, and a compiled graph's backward always runs whole, so with the last
    layer inside it each of those calls would repeat the decoder's entire backward pass.

    Raises
    ------
    ValueError
        If the module was sped up already (a second autocast wrapper or compile is a bug).
    """
    if getattr(module, _SPED_UP, False):
        raise ValueError(f"{type(module).__name__} is sped up already")
    nhwc = config.use_channels_last
    if nhwc:
        module.to(memory_format=torch.channels_last)
    if config.bf16 or nhwc:
        module.forward = FastForward(module, device_type, config.bf16, nhwc)
    if config.compile:
        for unit in compile_units(module):
            unit.compile(mode=config.compile_mode)
    setattr(module, _SPED_UP, True)
    return module


_SPED_UP = "_mmvq_sped_up"  # plain attribute, not in the state dict


def compile_units(module: nn.Module) -> list[nn.Module]:
    """The module itself, or its children that do not hold its ``last_layer`` weight."""
    last = getattr(module, "last_layer", None)
    if not isinstance(last, torch.Tensor):
        return [module]
    return [child for child in module.children()
            if not any(p is last for p in child.parameters())]


def tune_quantizers(model: nn.Module, config: SpeedConfig) -> int:
    """Set the nearest-code search block of every quantizer in ``model``; returns how many."""
    if config.search_block_elements is None:
        return 0
    tuned = 0
    for module in model.modules():
        if hasattr(module, "max_block_elements"):
            module.max_block_elements = config.search_block_elements
            tuned += 1
    return tuned


# -- optimizers ----------------------------------------------------------------------------------


def fuse_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fused copy of an unfused Adam/AdamW with the same groups; anything else unchanged.

    Raises
    ------
    ValueError
        If the optimizer has state already: call before the first step (and load optimizer
        state afterwards), since a fused Adam keeps its step counts on the device.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return optimizer
    if optimizer.defaults.get("fused"):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(p.device.type in DEVICE_TYPES and p.is_floating_point() for p in params):
        return optimizer
    if optimizer.state:
        raise ValueError(
            f"fuse_optimizer: {type(optimizer).__name__} has state already; apply the speed "
            "config before the first optimizer step"
        )
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    defaults.update(fused=True, foreach=None)
    groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
    return type(optimizer)(groups, **defaults)


# -- everything at once --------------------------------------------------------------------------


def apply_speed(
    config: SpeedConfig,
    device: torch.device | str,
    model: nn.Module | None = None,
    *,
    discriminators: Mapping[str, nn.Module] | None = None,
    perceptual: nn.Module | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> list[torch.optim.Optimizer]:
    """Turn on the fast path for a tokenizer and its training companions, in place.

    Call once, after moving everything to ``device`` and before the first optimizer step;
    before wrapping in DistributedDataParallel when ``channels_last`` is on (DDP's gradient
    buckets keep the layout they were built with).

    Parameters
    ----------
    config : which switches; on a device type outside ``config.device_types`` nothing changes
    device : where the modules live
    model : a MultimodalTokenizer (or a DDP wrapper of one): its encoder and decoder nets
        (``TOKENIZER_TARGETS``) are sped up and its quantizers get ``search_block_elements``
    discriminators : sped up one by one (keyed by modality, as from ``build_discriminators``)
    perceptual : the LPIPS net, sped up
    optimizers : returned in the same order, unfused Adam/AdamW replaced by fused copies

    Returns
    -------
    The optimizers to use from now on.
    """
    device = torch.device(device)
    config = config.for_device(device)
    if device.type not in config.device_types:
        return list(optimizers)
    set_backend_flags(config)
    for module in _targets(model, discriminators, perceptual):
        speed_up_module(module, config, device.type)
    if model is not None:
        tune_quantizers(model, config)
    if not config.fused_optimizer:
        return list(optimizers)
    return [fuse_optimizer(opt) for opt in optimizers]


def _targets(model: nn.Module | None, discriminators: Mapping[str, nn.Module] | None,
             perceptual: nn.Module | None) -> Iterable[nn.Module]:
    if model is not None:
        core = getattr(model, "module", model)  # inside a DDP wrapper
        yield from (getattr(core, name) for name in TOKENIZER_TARGETS if hasattr(core, name))
    if discriminators is not None:
        for disc in discriminators.values():
            yield getattr(disc, "module", disc)
    if perceptual is not None:
        yield perceptual
