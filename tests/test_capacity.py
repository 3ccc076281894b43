"""benchmarks/capacity.py: the capacity sweep's table and plots, from run files alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _capacity():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "benchmarks" / "capacity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(directory: Path, method: str, facts: int, seed: int, seen: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    run = {"method": method, "lr": 3e-3, "seed": seed, "steps": facts // 4, "facts": facts,
           "seen_em": seen, "test_em": seen / 2, "bits_recalled": seen * facts * 4,
           "bits_per_param": seen * facts * 4 / 1000, "trainable_params": 1000,
           "device_bytes": 5e8 if method == "lora:all:4" else 9e8, "host_state_bytes": None,
           "step_time_s": 1.0, "final_loss": 1.0}
    (directory / f"{method.replace(':', '_')}@0.003@seed{seed}.json").write_text(json.dumps(run))


def test_capacity_table_means_seeds_per_method_and_size(tmp_path: Path) -> None:
    capacity = _capacity()
    for people in (30, 120):
        for method, seen in (("lora:all:4", 0.5), ("meft:1024", 0.75)):
            _run(tmp_path / f"people-{people}", method, 4 * people, 0, seen * 30 / people)
    _run(tmp_path / "people-120", "meft:1024", 480, 1, 0.5)  # a second seed, largest size
    (tmp_path / "other").mkdir()  # not a size directory: ignored
    assert capacity.main([str(tmp_path)]) == 0
    data = json.loads((tmp_path / "capacity.json").read_text())
    cell = {(r["method"], r["facts"]): r for r in data}
    assert set(cell) == {(m, n) for m in ("lora:all:4", "meft:1024") for n in (120, 480)}
    assert cell[("meft:1024", 480)]["seeds"] == [0, 1]
    assert cell[("meft:1024", 480)]["seen_em"] == pytest.approx((0.1875 + 0.5) / 2)
    assert cell[("lora:all:4", 480)]["seen_em_std"] is None
    assert data[0]["method"] == "lora:all:4"  # fewer device bytes first
    table = (tmp_path / "table.md").read_text()
    assert "| meft:1024 | 75.0 / 37.5 | 34.4 ± 22.1 / 17.2 ± 11.0 |" in table
    assert "At 480 facts" in table
    for name in ("recall_vs_facts.png", "recall_vs_device_bytes.png",
                 "recall_vs_trainable_params.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_capacity_without_runs_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _capacity().main([str(tmp_path)]) == 2
    assert "no run files with facts" in capsys.readouterr().err
