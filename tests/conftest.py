"""Shared test fixtures: offline Hugging Face, deterministic torch, helpers for random BN statistics."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits():
    """160 training and 64 validation samples of sklearn's digits at 8x8 (tests may define their own)."""
    from .helpers import digit_subsets

    return digit_subsets(160, 64)
