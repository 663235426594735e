"""Tiny models on a busy 2-core machine: one torch thread avoids OpenMP oversubscription."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
