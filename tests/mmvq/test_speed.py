"""Step-time budget of the demo preset (run with ``make bench``; timing is machine-dependent).

Two DDP workers share the demo machine's two cores, so one worker's step must fit in 0.35 s on
one thread at batch 16.
"""

import time

import numpy as np
import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.train_step import build_optimizer, generator_step

BUDGET_S = 0.35


@pytest.mark.benchmark
def test_generator_step_fits_the_cpu_budget(make_batch):
    assert torch.get_num_threads() == 1  # set by conftest: one worker = one thread
    model = MultimodalTokenizer(TokenizerConfig())
    optimizer = build_optimizer(model)
    inputs = to_model_inputs(make_batch(16, seed=0))
    for _ in range(3):  # warm-up: allocator, oneDNN kernel selection
        generator_step(model, inputs, optimizer)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        generator_step(model, inputs, optimizer)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(f"generator_step batch 16, 1 thread: median {median:.3f} s, min {min(times):.3f} s")
    assert median <= BUDGET_S
