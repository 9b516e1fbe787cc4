"""Fixtures shared by the worker and speculation tests: tiny models loaded once, one CPU thread.

Imported by tests/worker/conftest.py and tests/speculation/conftest.py (pytest finds fixtures a
conftest imports).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from disaggserve_worker.model.loader import LoadedModel, load_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("builtin:tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_draft() -> LoadedModel:
    return load_model("builtin:tiny-llama-draft", device="cpu")


@pytest.fixture(scope="session")
def reference_greedy(tiny: LoadedModel) -> Callable[[list[int], int], list[int]]:
    """Greedy decoding with the uncached full-sequence forward: the ground truth."""

    def run(prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        out: list[int] = []
        for _ in range(n):
            token = int(tiny.model.reference_logits(torch.tensor(ids))[-1].argmax())
            out.append(token)
            ids.append(token)
        return out

    return run
