"""Files written by earlier versions keep working. Everything under tests/data was written by
meft 0.1.0 (commit 5ef3a87): adapter-0.1.0 with its base model's weights and the logits it
produced; run-0.1.0, a run stopped after 2 of 4 steps, with run-0.1.0-final, what the same run
gave without the stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny
from meft.adapter.model import MeftModel
from meft.cli.commands import main
from meft.config import MeftConfig

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "adapter-0.1.0"


def test_adapter_saved_by_0_1_0_loads_and_computes_what_it_did() -> None:
    base = tiny("llama")  # same architecture; the exact weights come from the file
    base.load_state_dict(load_file(str(DATA / "adapter-0.1.0-base.safetensors")))
    want = load_file(str(DATA / "adapter-0.1.0-logits.safetensors"))
    model = MeftModel.from_pretrained(base, OLD)
    assert model.meft_config.neurons == 64 and model.layer_ids == [0, 1, 2]
    with torch.no_grad():
        got = model(input_ids=want["input_ids"]).logits
        with model.disable_adapter():
            plain = model(input_ids=want["input_ids"]).logits
    torch.testing.assert_close(got, want["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want["logits"], atol=1e-3)  # the adapter matters


def test_old_config_fields_are_ignored_not_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((OLD / "adapter_config.json").read_text())
    assert "lr" in raw and "weight_decay" in raw  # 0.1.0 kept optimiser settings here
    config = MeftConfig.load(OLD)
    assert "lr" not in config.to_dict() and config.top_k == 8
    assert main(["info", "--adapter", str(OLD), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["host_table_bytes"] == 2 * 64 * 32 * 4 * 3


def test_run_stopped_by_0_1_0_resumes_to_what_0_1_0_would_have_trained(
        model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    """tests/data/run-0.1.0: `meft train ... --steps 4 --stop-after 2` by meft 0.1.0 (flat
    run_config.json, its checkpoint format); run-0.1.0-final: the adapter and metrics 0.1.0
    wrote training the same 4 steps without a stop. The tiny model and data are the
    fixtures' (the same builders made them). The comparison has a tolerance: the files were
    written on another CPU, whose BLAS kernels round differently (seen: 2e-8 on an AMD EPYC
    against files from an earlier machine); bit-for-bit resume on one machine is tested in
    test_resume."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(DATA / "run-0.1.0", run)
    recorded = json.loads((run / "run_config.json").read_text())
    assert "probe" in recorded and "adapter" not in recorded  # the 0.1.0 flat format
    recorded.update(model=str(model_dir), data=str(data_file))  # paths of this machine
    (run / "run_config.json").write_text(json.dumps(recorded))
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(DATA / "run-0.1.0-final" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    old = [json.loads(x)["loss"] for x in
           (DATA / "run-0.1.0-final" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(old, rel=1e-6)
