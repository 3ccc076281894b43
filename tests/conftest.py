"""Fixtures shared by the test modules (the builders are in helpers.py) and the slow marker.

Tests marked ``slow`` (real model, SIGKILL trials, subprocess benchmarks) run by default, as CI
runs them; ``pytest -m "not slow"`` skips them for a quick loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import save_tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _meft_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write to the user's ~/.cache/meft: generated background text (meft train
    protects by default) is cached once per session in a temporary directory."""
    import os

    os.environ["MEFT_CACHE"] = str(tmp_path_factory.mktemp("meft-cache"))


@pytest.fixture(autouse=True)
def _half_matmul_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half tables route in their dtype in every test (as on a CPU with native bf16), whatever
    this machine has; the tests of the float32 path (meft.sysinfo.half_matmul_native) set it
    themselves."""
    import torch

    from meft import sysinfo

    for dtype in (torch.bfloat16, torch.float16):
        monkeypatch.setitem(sysinfo._HALF_NATIVE, dtype, True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes seconds to minutes; deselect with "
                                       "-m 'not slow'")


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers_for_tests import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the tiny tokenizer, saved to disk."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 question/answer lines about 3 invented places."""
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = [{"question": f"Where was person {i} born?", "answer": [f"Teluvia{i % 3}"]}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
