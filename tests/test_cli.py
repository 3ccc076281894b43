"""The CLI end to end on a tiny random Llama with a tiny tokenizer: train, eval, generate, info,
and one clear line for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY
from meft.adapter.model import MeftModel
from meft.cli.commands import main


def test_train_eval_generate_info(model_dir: Path, data_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--output",
                 str(out), "--steps", "3", "--batch-size", "4", "--micro-batch-size", "2",
                 "--lr", "1e-2", "--max-new-tokens", "4", "--save-every", "2",
                 "--no-progress", *TINY])
    assert code == 0
    captured = capsys.readouterr()
    assert "before training: exact match" in captured.err  # a message, on stderr
    assert "held-out, after" in captured.out and "trained in" in captured.out  # the result
    assert "held-out, after" not in captured.err
    timings = json.loads((out / "run.json").read_text())["timings"]  # seconds per phase
    assert list(timings) == ["load", "eval_before", "probe", "protection", "training",
                             "eval_after", "retention"]
    assert all(t >= 0 for t in timings.values()) and "time: load " in captured.out
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    record = json.loads(lines[-1])
    assert len(record["union_per_layer"]) == 2 and record["mb_h2d"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000003"]
    for png in ("loss.png", "union.png", "transfer.png"):
        assert (out / png).stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 3 and set(run["scores"]) == {"before", "after"}

    assert main(["eval", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                 "--data", str(data_file), "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"exact_match", "f1", "contains", "n"} and result["n"] == 12
    assert result["exact_match"] <= result["contains"]

    prompt = "Where was person 1 born?"
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                 "--prompt", prompt, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == _greedy(model_dir, out / "adapter", prompt, 3) + "\n"

    assert main(["info", "--adapter", str(out / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["neurons"] == 64 and info["layers"] == 2 and info["hidden_size"] == 32
    assert info["host_table_bytes"] == 2 * 2 * 64 * 32 * 4


def _greedy(model_dir: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    """The greedy completion of ``prompt`` (chat template applied) through the Python API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = MeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return str(tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=True)).strip()


def test_output_directory_is_not_overwritten(model_dir: Path, data_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--output",
                 str(out), "--steps", "1", "--no-progress", *TINY])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meft: error:") and "--overwrite" in err and "\n" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--neurons", "100", "--experts", "7"], "must divide"),
        (["--top-k", "999"], "--top-k 999 must be"),
        (["--model", "/no/such/model"], "no such file or directory"),
        (["--data", "/no/such.jsonl"], "no such file"),
    ],
)
def test_bad_input_is_one_line(args: list[str], needle: str, model_dir: Path, data_file: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--model", str(model_dir), "--data", str(data_file), "--output",
            str(tmp_path / "run"), "--steps", "1", "--no-progress", *TINY]
    code = main(base + args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("meft: error:")]
    assert len(errors) == 1 and needle in errors[0] and err.splitlines()[-1] == errors[0]


def test_yaml_config_file(model_dir: Path, data_file: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dir}\ndata: {data_file}\nsteps: 2\nbatch-size: 3\n"
                   "neurons: 64\ntop_k: 4\nexperts: 8\nprobe: 2\nprogress: false\n"
                   "eval_before: false\nplots: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output", str(out), "--steps", "1"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["examples"] == 3  # flag beats file
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    capsys.readouterr()
    assert main(["train", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == (f"meft: error: --config {bad}: unknown key "
                                       "'nonsense_key'\n")
    bad.write_text("steps: many\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "steps must be a positive integer, got 'many'" in capsys.readouterr().err
    bad.write_text("steps: [1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"--config {bad}:2: invalid YAML" in capsys.readouterr().err
