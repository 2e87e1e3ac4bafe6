"""The training checkpoint: everything a run needs to continue exactly where it stopped.

A checkpoint is one directory, written by every rank into the same place (Ray Train merges the
ranks' files into one directory in storage):

| file | written by | what |
| --- | --- | --- |
| ``state.json`` | rank 0 | format version, step, data position (epoch, batches consumed in it), MLflow run id |
| ``generator.safetensors`` | rank 0 | the tokenizer's raw weights and buffers |
| ``ema.safetensors`` | rank 0 | the EMA of the generator (when EMA is on) |
| ``discriminators.safetensors`` | rank 0 | the discriminators (when the GAN is on) |
| ``optim.pt`` | rank 0 | optimizer and LR-scheduler state dicts (loaded with ``weights_only=True``) |
| ``rng_rank{r}.pt`` | every rank | torch (CPU and CUDA), numpy and Python RNG states of rank r |
| ``weights_rank{r}.sha256`` | every rank | hash of rank r's generator: DDP replicas must agree |
| ``tokenizer/`` | rank 0 | the weights to ship (EMA when on), as ``MultimodalTokenizer.save`` writes them |

Model tensors are safetensors (loading them can never run code); the optimizer state is our own
file written with ``torch.save`` and read back with ``weights_only=True`` for the same reason.
Plain torch and files only, so a checkpoint can be written and read without Ray.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

# Bump when the layout or the meaning of a field changes; older checkpoints are refused by name.
FORMAT_VERSION = 1
STATE_FILE = "state.json"
TOKENIZER_DIR = "tokenizer"
_TENSOR_FILES = {"generator": "generator.safetensors", "ema": "ema.safetensors",
                 "discriminators": "discriminators.safetensors"}
_OPTIM_FILE = "optim.pt"


@dataclass(frozen=True)
class TrainState:
    """Where a run stands, besides its tensors."""

    step: int  # optimizer steps taken
    epoch: int  # epoch the next batch comes from
    batches_in_epoch: int  # micro-batches of that epoch each rank has consumed already
    mlflow_run_id: str | None = None  # the run that holds this training's metric history


def save_checkpoint(
    directory: Path,
    state: TrainState,
    modules: Mapping[str, nn.Module | None],
    optim: Mapping[str, Any],
    rank: int,
    export: nn.Module | None = None,
) -> None:
    """Write rank ``rank``'s part of a checkpoint into ``directory``.

    Parameters
    ----------
    directory : an empty local directory, handed to ``ray.train.Checkpoint.from_directory``
    state : step, data position and MLflow run id
    modules : ``generator``, ``ema``, ``discriminators`` (unwrapped modules; None: absent)
    optim : name -> object with ``state_dict()`` (optimizers, LR schedulers)
    rank : only rank 0 writes the model and optimizer state; every rank writes its RNG states
    export : the model to ship under ``tokenizer/`` (EMA when on), rank 0 only
    """
    import safetensors.torch
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    generator = modules["generator"]
    (directory / f"weights_rank{rank}.sha256").write_text(generator.weights_hash() + "\n")
    if rank != 0:
        return
    for name, module in modules.items():
        if module is not None:
            safetensors.torch.save_file(_contiguous(module.state_dict()),
                                        str(directory / _TENSOR_FILES[name]))
    torch.save({name: obj.state_dict() for name, obj in optim.items()}, directory / _OPTIM_FILE)
    if export is not None:
        export.save(directory / TOKENIZER_DIR)
    # Last: a directory with state.json is complete.
    (directory / STATE_FILE).write_text(
        json.dumps({"format_version": FORMAT_VERSION, **asdict(state)}, indent=2) + "\n")


def load_checkpoint(
    directory: Path,
    modules: Mapping[str, nn.Module | None],
    optim: Mapping[str, Any],
    rank: int,
) -> TrainState:
    """Restore modules, optimizers, schedulers and this rank's RNG states from ``directory``.

    Raises
    ------
    ValueError
        Naming the file: not a checkpoint, another format version, a module the checkpoint
        lacks (EMA or GAN switched on since), or tensors that do not fit the configured model.
    """
    import safetensors.torch
    import torch

    directory = Path(directory)
    state = read_state(directory)
    for name, module in modules.items():
        if module is None:
            continue
        path = directory / _TENSOR_FILES[name]
        if not path.is_file():
            raise ValueError(f"{directory}: checkpoint has no {_TENSOR_FILES[name]}, but the "
                             f"config asks for {name} (switched on after this run started?)")
        try:
            module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: does not fit the configured {name} ({err})") from err
    saved = torch.load(directory / _OPTIM_FILE, map_location="cpu", weights_only=True)
    for name, obj in optim.items():
        if name not in saved:
            raise ValueError(f"{directory / _OPTIM_FILE}: no state for {name!r} (switched "
                             "on after this run started? the GAN adds optimizer/discriminator, "
                             "fusion.align_head_steps > 0 optimizer/align_heads)")
        obj.load_state_dict(saved[name])
    rng = directory / f"rng_rank{rank}.pt"
    # A run restarted on fewer ranks than it saved finds its own file; more ranks take rank 0's.
    _set_rng_state(torch.load(rng if rng.is_file() else directory / "rng_rank0.pt",
                              weights_only=True))
    return state


def rank_weight_hashes(directory: Path) -> dict[int, str]:
    """Rank -> hash of that rank's generator weights at this checkpoint (all equal under DDP)."""
    return {int(p.stem.removeprefix("weights_rank")): p.read_text().strip()
            for p in Path(directory).glob("weights_rank*.sha256")}


def read_state(directory: Path) -> TrainState:
    """The :class:`TrainState` of a checkpoint directory, checking its format version."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a training checkpoint (no {STATE_FILE})")
    meta = json.loads(path.read_text())
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r}, this code reads "
                         f"{FORMAT_VERSION}")
    return TrainState(**meta)


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous and shared-storage tensors; clone gives each its own.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _rng_state() -> dict[str, Any]:
    """Every generator a step may draw from, in types ``torch.load(weights_only=True)`` reads."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
