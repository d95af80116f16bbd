"""Shared helpers for the tests: tiny models, tiny tokenizers, and where the shared data lives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2_tokenizer.model"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    """The real LLaMA-2 tokenizer from ../shared, or a clean skip where it is absent."""
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"{LLAMA2_TOKENIZER} not present (realism check only)")
    return LLAMA2_TOKENIZER
