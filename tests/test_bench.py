"""The comparison benchmark: method parsing, target logic, and every method on a tiny model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meft.bench import (
    BenchConfig,
    Method,
    evaluate_targets,
    markdown_table,
    parse_method,
    run_method,
)
from meft.data import encode
from meft.synthetic import make_knowledge_set
from tokenizers_for_tests import make_tokenizer


def test_parse_method() -> None:
    assert parse_method("lora:qv:16") == Method("lora", rank=16, targets="qv")
    assert parse_method("meft:4096") == Method("meft", neurons=4096)
    assert parse_method("meft-noexperts:16384").name == "meft-noexperts:16384"
    for bad in ("lora:16", "dense", "meft:big", "sparse:10", "lora:xy:4"):
        with pytest.raises(ValueError, match="expected lora:qv:R"):
            parse_method(bad)


def _result(method: str, step: float, em: float, moved: float, device: float) -> dict:
    kind = method.split(":")[0]
    return {"method": method, "kind": kind, "step_time_s": step, "exact_match": em,
            "moved_bytes_per_step": moved, "device_bytes": device}


def test_targets_pass_fail_and_skip() -> None:
    results = [
        _result("meft:16384", 2.0, 0.50, 100.0, 900.0),
        _result("lora:qv:16", 1.8, 0.30, 0.0, 550.0),
        _result("dense:16384", 7.0, 0.52, 0.0, 3000.0),
        _result("offload:16384", 8.0, 0.52, 1000.0, 700.0),
    ]
    verdicts = {t["target"]: t["passed"] for t in evaluate_targets(results)}
    assert verdicts == {
        "meft step time <= 1.25x LoRA r=16": True,  # 1.11x
        "meft >= 3x faster than dense, same N": True,  # 3.5x
        "meft bytes moved <= 0.3x dense offload": True,  # 0.1x
        "meft EM >= dense EM - 3 points": True,  # -2 points
        "meft EM >= LoRA (nearest device bytes) + 10 points": True,  # +20
    }
    results[0]["step_time_s"] = 2.5  # 1.39x LoRA, 2.8x dense
    results[0]["exact_match"] = 0.45  # -7 vs dense, +15 vs LoRA
    verdicts = {t["target"]: t["passed"] for t in evaluate_targets(results)}
    assert verdicts["meft step time <= 1.25x LoRA r=16"] is False
    assert verdicts["meft >= 3x faster than dense, same N"] is False
    assert verdicts["meft EM >= dense EM - 3 points"] is False
    assert all(t["passed"] is None for t in evaluate_targets(results[:1]))


KINDS = ["dense:32", "offload:32", "meft:64", "meft-noexperts:64"]
if importlib.util.find_spec("peft") is not None:
    KINDS.append("lora:qv:4")


@pytest.mark.parametrize("name", KINDS)
def test_every_method_trains_on_a_tiny_model(name: str) -> None:
    tok = make_tokenizer()
    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tok, 64) for s in ks.train]
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    cfg = BenchConfig(steps=3, batch_size=4, top_k=4, n_probe=2, max_eval=4,
                      max_new_tokens=3)
    result = run_method(parse_method(name), base, tok, train, ks.eval, cfg,
                        torch.device("cpu"), progress=False)
    assert result["method"] == name and result["steps"] == 3
    assert result["step_time_s"] > 0 and result["trainable_params"] > 0
    assert result["eval_n"] == 4 and 0 <= result["exact_match"] <= 1
    d, layers = 32, 2
    if name.startswith("offload"):
        assert result["moved_bytes_per_step"] == 4 * 32 * d * 4 * layers
    elif name.startswith("meft"):
        assert result["moved_bytes_per_step"] > 0
    else:
        assert result["moved_bytes_per_step"] == 0
    assert result["device_bytes"] >= result["device_bytes_base"]
    assert "| " + name + " |" in markdown_table([result])
