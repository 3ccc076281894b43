"""Files written by earlier versions keep working: tests/data/adapter-0.1.0 was saved by
meft 0.1.0 (commit 5ef3a87) with its base model's weights and the logits it produced."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import tiny
from meft.cli import main
from meft.config import MeftConfig
from meft.model import MeftModel

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "adapter-0.1.0"


def test_adapter_saved_by_0_1_0_loads_and_computes_what_it_did() -> None:
    base = tiny("llama")  # same architecture; the exact weights come from the file
    base.load_state_dict(load_file(str(DATA / "adapter-0.1.0-base.safetensors")))
    want = load_file(str(DATA / "adapter-0.1.0-logits.safetensors"))
    model = MeftModel.from_pretrained(base, OLD)
    assert model.config.neurons == 64 and model.layer_ids == [0, 1, 2]
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
