"""meft plan: its memory and traffic counts against what training allocates and moves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import meft_config, tiny
from meft.adapter.model import get_meft_model
from meft.cli.commands import main
from meft.cli.plan import PROFILES, Shape, calibrate, fit_neurons, parse_bytes, plan, probed_experts
from meft.errors import ConfigError
from meft.sysinfo import total_host_bytes
from meft.training.trainer import TrainConfig, Trainer
from test_retain import examples

HOST = {"host_gflops": 100.0, "host_gbps": 5.0}


def _shape(model: torch.nn.Module) -> Shape:
    return Shape("tiny", sum(p.numel() for p in model.parameters()), 32, 3)


@pytest.mark.parametrize(("dtype", "state"), [("float32", "fp32"), ("bfloat16", "8bit"),
                                               ("bfloat16", "rowwise"),
                                               ("bfloat16", "factored")])
def test_host_bytes_and_traffic_are_what_training_has(dtype: str, state: str,
                                                      tmp_path: Path) -> None:
    """Host bytes: exactly the tables and optimizer state a run allocates. Bytes moved: within
    1% of what TransferStats counted in a step, given the step's U (one micro-batch)."""
    config = meft_config(host_dtype=dtype, optim_state=state)
    model = get_meft_model(tiny("llama"), config)
    trainer = Trainer(model, examples(4, pad=False), TrainConfig(steps=1, batch_size=4,
                                                                 progress=False),
                      tmp_path, pad_id=0)
    host = sum(s.keys.nbytes + s.values.nbytes for s in model.stores) + sum(
        t.nbytes for n, t in trainer.optimizers.state_tensors().items() if n.startswith("host."))
    record = trainer.train().history[0]
    tokens = 4 * 8
    union = round(record["union_mean"])
    p = plan(config, _shape(model.base_model), tokens=tokens, union=union,
             hardware={**PROFILES["a10-24g"], "host_memory": 1e12}, host_rates=HOST)
    assert p["host_bytes"]["tables_and_moments"] == host
    assert p["moved_bytes"]["h2d"] == pytest.approx(record["mb_h2d"] * 1e6, rel=0.01)
    assert p["moved_bytes"]["d2h"] == pytest.approx(record["mb_d2h"] * 1e6, rel=0.01)


def test_fit_finds_the_largest_n_that_fits() -> None:
    shape = Shape("llama-7b-like", 6_738_000_000, 4096, 32)
    kw = {"tokens": 512, "hardware": {**PROFILES["a10-24g"], "host_memory": 128e9},
          "host_rates": HOST}
    config = meft_config(neurons=4096, experts=64, top_k=64, n_probe=8)
    n = fit_neurons(config, shape, **kw)
    assert n % 1024 == 0 and n > 0
    fits = plan(meft_config(neurons=n, experts=None, top_k=64, n_probe=8), shape, **kw)
    assert all(fits["fits"].values())
    assert fits["host_total"] <= 128e9 - fits["host_reserve"] and fits["host_reserve"] == 12.8e9
    beyond = plan(meft_config(neurons=n + 1024, experts=None, top_k=64, n_probe=8), shape,
                  **kw)
    assert not all(beyond["fits"].values())
    on_disk = plan(meft_config(neurons=n, experts=None, top_k=64, n_probe=8), shape,
                   store="disk", **kw)
    assert on_disk["disk_bytes"] == fits["host_bytes"]["tables_and_moments"]
    keys = 32 * n * 4096 * 4  # every layer's fp32 keys: routing probes nearly every block
    assert 0.9 * keys < on_disk["host_bytes"]["probed_keys"] <= keys
    assert on_disk["host_total"] < 0.25 * fits["host_total"]  # RAM: one step's pages
    compact = fit_neurons(meft_config(neurons=4096, experts=64, top_k=64, n_probe=8,
                                      host_dtype="bfloat16", optim_state="8bit"), shape,
                          **kw)
    assert compact > 2.5 * n  # 4 bytes per parameter instead of 12


def test_sizes_and_the_command(tmp_path: Path, model_dir: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_bytes("24GB") == 24e9 and parse_bytes("2 GiB") == 2 * 2**30
    # one meaning: a bare number counts GB (it read 24 bytes before), G is GB
    assert parse_bytes("24") == parse_bytes("24G") == parse_bytes("24gb") == 24e9
    assert parse_bytes("512MB") == parse_bytes("512m") == 512e6
    for bad in ("0", "-3GB", "24 GiG", "lots"):
        with pytest.raises(ConfigError, match="expected a size like 24, 24GB or 128GiB"):
            parse_bytes(bad)
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    assert main(["plan", "--model", str(model_dir), "--neurons", "64", "--top-k", "4",
                 "--experts", "8", "--n-probe", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hidden_size"] == 32 and out["adapter_layers"] == 2
    assert out["adapter_parameters"] == 2 * 64 * 32 * 2
    config = tiny("llama").config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--neurons", "64",
                 "--top-k", "4", "--experts", "8", "--n-probe", "2", "--gpu-memory", "1GB"]) == 0
    assert "device" in capsys.readouterr().out
    assert main(["plan", "--model", str(model_dir), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: expected a size like 24" in capsys.readouterr().err
    # --gpu-memory 24 is 24 GB; the host memory is this machine's, less a stated reserve
    assert main(["plan", "--model", str(model_dir), "--neurons", "64", "--top-k", "4",
                 "--experts", "8", "--n-probe", "2", "--gpu-memory", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["gpu_memory"] == 24e9 and out["fits"]["device"]
    assert out["hardware"]["host_memory"] == total_host_bytes()
    assert out["host_reserve"] == max(2e9, 0.1 * total_host_bytes())
    assert main(["plan", "--model", str(model_dir), "--profile", "h100-80g", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware"]["gpu_memory"] == 80e9
    rates = calibrate(tmp_path / "calibration.json", d=16, rows=64)
    assert rates["host_gflops"] > 0 and rates["host_gbps"] > 0
    assert json.loads((tmp_path / "calibration.json").read_text())["threads"] >= 1


@pytest.mark.parametrize(("experts", "tokens"), [(2048, 552), (256, 40), (64, 3)])
def test_probed_experts_is_the_expected_count_under_uniform_routing(experts: int,
                                                                   tokens: int) -> None:
    config = meft_config(neurons=experts * 16, experts=experts, top_k=8, n_probe=8)
    g = torch.Generator().manual_seed(experts + tokens)
    counts = [len(torch.cat([torch.randperm(experts, generator=g)[:8] for _ in range(tokens)])
                  .unique()) for _ in range(50)]
    assert probed_experts(config, tokens) == pytest.approx(sum(counts) / 50, rel=0.02)


def test_plan_says_which_dtype_half_tables_route_in(
        model_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from meft import sysinfo

    flags = ["plan", "--model", str(model_dir), "--neurons", "64", "--top-k", "4",
             "--host-dtype", "bfloat16"]
    for native, says in ((False, "route in float32 on this CPU (no native half matmul"),
                         (True, "route in bfloat16 on this CPU (native half matmuls)")):
        monkeypatch.setitem(sysinfo._HALF_NATIVE, torch.bfloat16, native)
        assert main(flags) == 0
        assert says in capsys.readouterr().out
    assert main(["plan", "--model", str(model_dir), "--neurons", "64", "--top-k", "4"]) == 0
    assert "route in" not in capsys.readouterr().out  # fp32 tables: nothing to say
