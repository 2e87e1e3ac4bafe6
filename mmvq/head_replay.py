"""Extra updates of fusion's alignment heads on a replay of recent quantized latents.

Fusion's pooling and embedding heads (:meth:`mmvq.fusion.Fusion.alignment_heads`) learn
``align/infonce`` from one gradient step per batch. On the demo's schedule that is far too few
presentations for InfoNCE to rise above chance (heads R@5 0.02-0.05 on val, while a probe fitted
to the same frozen tokens reached 0.12-0.35; BENCHMARKS.md "Why fusion's heads stay at
chance"). The heads are small and read only the detached quantized latents, so after each
train step this trainer takes ``FusionConfig.align_head_steps`` more steps on the heads alone,
each on a batch drawn from the last ``align_replay_samples`` samples' latents. The encoders
are untouched (the latents are detached), so reconstruction pays nothing; the latents in the
replay are at most a few steps old, and the heads track them as the codecs train.

Under DDP every rank draws from its own replay and takes every rank's samples as negatives
(``Fusion.alignment_loss`` gathers them in training mode); the heads' gradients are averaged
over ranks before each update, so the heads stay identical everywhere, as DDP keeps them.
These updates run outside the DDP module's forward, whose reducer then ignores the gradient
hooks, so the unwrapped fusion module is called directly.

The replay holds ``align_replay_samples`` samples' latents on the model's device, float32: each
sample costs 4 bytes x (image grid positions + audio frames + text positions) x code width
(12 KiB in the demo, 18 MiB for 1536 samples). It is not checkpointed: a resumed run refills it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmvq.quantizers.distributed import all_reduce_sum_, world_size


class AlignmentHeadTrainer:
    """Owns the replay and the heads' optimizer; :meth:`add` each micro-batch, then :meth:`step`.

    Parameters
    ----------
    optimizer : over exactly ``fusion.alignment_heads()`` (its learning-rate schedule is the
        caller's, like every optimizer of the train step)
    steps : head updates per train step (0: the trainer does nothing)
    capacity : samples kept in the replay; the oldest are overwritten first
    grad_clip : max norm of the heads' gradient per update, or None
    seed : of the draws from the replay
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, capacity: int,
                 grad_clip: float | None = None, seed: int = 0) -> None:
        if steps < 0 or capacity < 2:
            raise ValueError(f"need steps >= 0 and capacity >= 2, got {steps} and {capacity}")
        self.optimizer = optimizer
        self.steps, self.capacity, self.grad_clip = steps, capacity, grad_clip
        self._generator = torch.Generator().manual_seed(seed)
        self._latents: dict[str, torch.Tensor] = {}  # modality -> (capacity, N_m, D_m)
        self._present: dict[str, torch.Tensor] = {}  # modality -> (capacity,) bool
        self._next = 0  # ring position of the next sample written
        self._filled = 0  # samples held, <= capacity
        self._draw = 0  # samples per update: the last micro-batch's size

    def __len__(self) -> int:
        return self._filled

    @torch.no_grad()
    def add(self, latents: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]) -> None:
        """Keep one batch: ``latents`` modality -> (B, N_m, D_m) (``TokenizerOutput.latents``),
        ``present`` modality -> (B,) bool.

        Raises
        ------
        ValueError
            If a modality's per-sample shape differs from the batches already kept.
        """
        if self.steps == 0:
            return
        batch = next(iter(latents.values())).shape[0]
        if not self._latents:
            self._latents = {m: x.new_zeros((self.capacity, *x.shape[1:]), dtype=torch.float32)
                             for m, x in latents.items()}
            self._present = {m: torch.zeros(self.capacity, dtype=torch.bool, device=x.device)
                             for m, x in latents.items()}
        for m, x in latents.items():
            if x.shape[1:] != self._latents[m].shape[1:]:
                raise ValueError(f"alignment-head replay: {m} latents of shape {tuple(x.shape[1:])} "
                                 f"per sample, but it holds {tuple(self._latents[m].shape[1:])}")
        rows = (self._next + torch.arange(batch)) % self.capacity
        for m, x in latents.items():
            self._latents[m][rows.to(x.device)] = x.detach().float()
            self._present[m][rows.to(x.device)] = present[m].to(x.device)
        self._next = int(rows[-1] + 1) % self.capacity
        self._filled = min(self.capacity, self._filled + batch)
        self._draw = batch

    def step(self, fusion: nn.Module) -> dict[str, float]:
        """``steps`` updates of the heads of ``fusion`` (the unwrapped module, in train mode);
        returns ``align/head_infonce``, their mean loss (nothing while the replay is too small
        to draw a batch with a negative)."""
        if self.steps == 0 or self._filled < 2:
            return {}
        heads = fusion.alignment_heads()
        total = 0.0
        for _ in range(self.steps):
            rows = torch.randint(self._filled, (self._draw,), generator=self._generator)
            device = next(iter(self._latents.values())).device
            rows = rows.to(device)
            latents = {m: x[rows] for m, x in self._latents.items()}
            present = {m: p[rows] for m, p in self._present.items()}
            self.optimizer.zero_grad(set_to_none=True)
            loss = fusion.alignment_loss(fusion.embed_latents(latents), present)
            loss.backward()
            _average_over_ranks(heads)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(heads, self.grad_clip)
            self.optimizer.step()
            total += float(loss.detach())
        return {"align/head_infonce": total / self.steps}


def _average_over_ranks(params: list[nn.Parameter]) -> None:
    """Every rank's gradients replaced by their mean over ranks, in one flat all-reduce (a
    parameter without a gradient counts as zeros, so every rank sends the same layout)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum_(flat).div_(world)
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
