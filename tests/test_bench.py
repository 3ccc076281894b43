"""The comparison benchmark: method parsing, target logic, every method on a tiny model, and
`meft bench` end to end, whose meft losses must equal `meft train`'s."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_for
from meft.bench.methods import Method, parse_method
from meft.bench.report import evaluate_targets, markdown_table
from meft.bench.run import run_method
from meft.cli import main
from meft.config import BenchJob, ConfigError
from meft.data import encode
from meft.synthetic import make_knowledge_set


def test_parse_method() -> None:
    assert parse_method("lora:qv:16") == Method("lora", rank=16, targets="qv")
    assert parse_method("meft:4096") == Method("meft", neurons=4096)
    assert parse_method("meft-noexperts:16384").name == "meft-noexperts:16384"
    assert parse_method("full") == Method("full") and Method("full").name == "full"
    for bad in ("lora:16", "dense", "meft:big", "sparse:10", "lora:xy:4", "meft:0", "full:8"):
        with pytest.raises(ConfigError, match="expected lora:qv:R"):
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


KINDS = ["dense:32", "offload:32", "meft:64", "meft-noexperts:64", "full"]
if importlib.util.find_spec("peft") is not None:
    KINDS.append("lora:qv:4")


@pytest.mark.parametrize("name", KINDS)
def test_every_method_trains_on_a_tiny_model(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    base = tiny_for(tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    job = BenchJob.from_options({"steps": 3, "batch_size": 4, "top_k": 4, "n_probe": 2,
                                 "max_eval": 4, "max_new_tokens": 3, "progress": False})
    result = run_method(parse_method(name), base, tokenizer, train, ks.eval, job,
                        torch.device("cpu"))
    assert result["method"] == name and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    assert result["lr"] == {"lora": 1e-3, "full": 1e-4}.get(name.split(":")[0], 3e-3)
    assert result["train_config"]["weight_decay"] == 0.0  # the loop's, not torch's default
    assert result["eval_n"] == 4 and 0 <= result["exact_match"] <= 1
    d, layers = 32, 2
    if name.startswith("offload"):
        assert result["moved_bytes_per_step"] == 4 * 32 * d * 4 * layers
        assert result["trainable_params"] == 2 * 32 * d * layers
    elif name.startswith("dense"):
        assert result["trainable_params"] == 2 * 32 * d * layers
        assert result["device_bytes_trainable"] == 4 * 2 * 32 * d * layers * 4
    elif name == "full":  # every base weight trains: + gradients and two moments on device
        n_base = sum(p.numel() for p in base.parameters())
        assert result["trainable_params"] == n_base
        assert result["device_bytes_trainable"] == 3 * 4 * n_base
        assert result["device_bytes_base"] == 4 * n_base
    elif name.startswith("meft"):
        assert result["moved_bytes_per_step"] > 0 and result["union_mean"] > 0
        assert result["adapter_config"]["neurons"] == 64
    else:
        assert result["moved_bytes_per_step"] == 0
    assert result["device_bytes"] >= result["device_bytes_base"]
    assert "| " + name + " |" in markdown_table([result])
    # the base model given was copied, not trained
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_bench_end_to_end_and_equal_to_meft_train(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two methods, JSON per run and a table; meft:64's losses are meft train's, step by step."""
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--top-k", "4",
              "--experts", "8", "--probe", "2", "--no-progress"]
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "meft:64", "dense:32", "--no-eval", "--output",
                 str(out), *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "dense_32.json", "meft_64.json", "step_time_vs_n.png", "table.md"]
    table = (out / "table.md").read_text()
    assert "| meft:64 |" in table and "| dense:32 |" in table
    bench = json.loads((out / "meft_64.json").read_text())
    assert bench["config"]["bench"]["steps"] == 3 and bench["environment"]["torch"]
    assert bench["adapter_config"]["experts"] == 8 and len(bench["losses"]) == 3

    run = tmp_path / "train"
    assert main(["train", "--neurons", "64", "--output", str(run), "--no-eval-before",
                 "--max-eval", "2", "--max-new-tokens", "2", "--no-plots", *common]) == 0
    trained = json.loads((run / "run.json").read_text())
    assert trained["losses"] == bench["losses"]  # the same loop, bit for bit
    assert trained["config"]["adapter"] == {**bench["adapter_config"],
                                            "base_model": trained["config"]["adapter"][
                                                "base_model"]}

    # a second invocation into the same directory adds its run and keeps the others
    capsys.readouterr()
    assert main(["bench", "--methods", "meft-noexperts:64", "--no-eval", "--output", str(out),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in ("meft:64", "dense:32", "meft-noexperts:64"))


def test_bench_refuses_bad_methods_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--methods", "meft:64", "lora:16"]) == 2
    assert "method 'lora:16'" in capsys.readouterr().err
    assert main(["bench", "--methods", "meft:64", "--top-k", "99", "--experts", "8",
                 "--probe", "2"]) == 2
    assert "top_k=99" in capsys.readouterr().err
