"""``meft bench --sets S``: disjoint fact sets learned one after another, by any method.

The specification is the plain loop: a continual run's losses are those of Trainers run by
hand, one per set, on one model; its first set is an ordinary one-set run; the table's shares
kept come from the exact matches measured after each set."""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import tiny_for
from meft.cli.bench.methods import build, parse_method
from meft.cli.bench.report import aggregate, continual_table
from meft.cli.bench.run import continual_fields, run_method
from meft.cli.commands import main
from meft.config import BenchJob, ConfigError
from meft.data.datasets import load_splits, split_sets
from meft.data.records import encode
from meft.training.trainer import Trainer


def test_split_sets_cuts_disjoint_sets_of_whole_people() -> None:
    whole = load_splits(None, None, people=6, seed=3)
    parts = split_sets(whole, 3)
    assert [len(p.test) for p in parts] == [8, 8, 8]
    people = [{s.source.rsplit(" ", 1)[0] for s in p.test} for p in parts]
    assert [len(p) for p in people] == [2, 2, 2]  # two whole people (4 facts each) per set
    assert not (people[0] & people[1]) and not (people[1] & people[2])
    for name in ("train", "validation", "test", "seen"):  # every sample in exactly one set
        got = sorted((s.source, s.messages[0]["content"]) for p in parts
                     for s in getattr(p, name))
        assert got == sorted((s.source, s.messages[0]["content"]) for s in getattr(whole, name))
    for p in parts:
        assert {s.source for s in p.train} == set(p.bits) == {s.source for s in p.test}
        assert p.adjacent == whole.adjacent
    with pytest.raises(ValueError, match="24 facts do not split into 5 sets"):
        split_sets(whole, 5)


def test_continual_fields() -> None:
    got = continual_fields([[0.5], [0.25, 0.8], [0.5, 0.4, 0.9]])
    assert got["continual_kept"] == [1.0, 0.5]
    assert got["continual_kept_mean"] == 0.75 and got["continual_kept_min"] == 0.5
    assert continual_fields([[0.0], [0.0, 0.5], [0.1, 0.5, 0.5]])["continual_kept"] == [None,
                                                                                      1.0]
    assert continual_fields([])["continual_kept_mean"] is None
    assert continual_fields([[0.3]])["continual_kept_min"] is None  # no earlier set


@pytest.mark.parametrize("name", ["meft:64", "meft:64+retain"])
def test_a_continual_run_is_trainers_run_by_hand_one_per_set(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    parts = split_sets(load_splits(None, None, people=4, seed=0), 2)
    trains = [[encode(s, tokenizer, 64) for s in p.train] for p in parts]
    base = tiny_for(tokenizer)
    job = BenchJob.from_options({"steps": 3, "batch_size": 4, "top_k": 4, "n_probe": 2,
                                 "max_eval": 4, "max_new_tokens": 3, "progress": False})
    method = parse_method(name)
    background = parts[0].test + parts[1].test  # any questions do as a replay pool here
    every = [s for p in parts for s in p.test]
    result = run_method(method, base, tokenizer, trains[0] + trains[1], every, every, job,
                        torch.device("cpu"), background=background,
                        sets=[(t, p.test) for t, p in zip(trains, parts, strict=True)])
    assert result["steps"] == 6 and len(result["losses"]) == 6
    grid = result["continual_test_em"]
    assert [len(row) for row in grid] == [1, 2] and all(0 <= x <= 1 for r in grid for x in r)
    assert result == {**result, **continual_fields(grid)}
    assert result["test_n"] == 4  # --max-eval 4 of all sets' questions, at the end
    # the first set is an ordinary one-set run
    first = run_method(method, base, tokenizer, trains[0], parts[0].test, parts[0].test, job,
                       torch.device("cpu"), background=background)
    assert first["losses"] == result["losses"][:3] and first["continual_test_em"] is None
    if method.retain:
        return
    # the plain loop: one model, a Trainer per set, by hand
    tconfig = dataclasses.replace(job.train_config(method.default_lr), retain="off")
    torch.manual_seed(tconfig.seed)
    trainable = build(method, copy.deepcopy(base), job, torch.device("cpu"))
    losses = []
    for t in trains:
        with tempfile.TemporaryDirectory() as tmp:
            losses += [r["loss"] for r in Trainer(trainable, t, tconfig, tmp,
                                                  pad_id=tokenizer.pad_token_id).train().history]
    assert losses == result["losses"]


def test_continual_table_means_over_seeds() -> None:
    runs = [{"method": "meft:64", "lr": 3e-3, "seed": s, "step_time_s": 1.0, "tokens_per_s": 1.0,
             **continual_fields(grid)}
            for s, grid in enumerate(([[0.5], [0.25, 0.5]], [[1.0], [0.5, 1.0]]))]
    rows = aggregate(runs)
    assert rows[0]["continual_kept_mean"] == 0.5
    table = continual_table(rows)
    assert "| meft:64 | 0.003 | 0,1 | 75.0 / 75.0 | 37.5 / 75.0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" \
        in table
    assert continual_table(aggregate([{**runs[0], **continual_fields([])}])) == ""


def test_sets_only_for_the_built_in_synthetic_set(data_file: Path) -> None:
    with pytest.raises(ConfigError, match="--sets 3 splits the built-in synthetic set"):
        BenchJob.from_options({"sets": 3, "dataset": "airports"})
    with pytest.raises(ConfigError, match="does not take --data"):
        BenchJob.from_options({"sets": 2, "data": str(data_file)})


@pytest.mark.slow
def test_bench_sets_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "meft:64", "--sets", "2", "--people", "2", "--model",
                 str(model_dir), "--steps", "2", "--batch-size", "4", "--top-k", "4",
                 "--experts", "8", "--n-probe", "2", "--max-eval", "4", "--max-new-tokens",
                 "2", "--no-retention", "--no-progress", "--output", str(out)]) == 0
    run = json.loads((out / "meft_64@0.003.json").read_text())
    assert run["steps"] == 4 and [len(r) for r in run["continual_test_em"]] == [1, 2]
    assert run["facts"] == 16 and "learned as 2 sets of 2 people" in run["data"]
    assert "Continual learning" in (out / "table.md").read_text()
