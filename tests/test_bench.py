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
from meft.cli.bench.methods import Method, parse_entry, parse_method
from meft.cli.bench.report import markdown_table
from meft.cli.bench.run import run_method
from meft.cli.commands import main
from meft.config import BenchJob, ConfigError
from meft.data.records import encode
from meft.data.synthetic import make_knowledge_set


def test_parse_method() -> None:
    assert parse_method("lora:qv:16") == Method("lora", rank=16, targets="qv")
    assert parse_method("meft:4096") == Method("meft", neurons=4096)
    assert parse_method("meft-noexperts:16384").name == "meft-noexperts:16384"
    assert parse_method("full") == Method("full") and Method("full").name == "full"
    assert parse_method("meft:64+retain") == Method("meft", neurons=64, retain=True)
    assert parse_method("meft:64+retain").name == "meft:64+retain"
    swept = parse_method("meft:64+retain:rep4:repw0.5:answers:whole")
    assert swept.name == "meft:64+retain:rep4:repw0.5:answers:whole"
    assert swept.retain_overrides() == {"retain_replay": 4, "retain_replay_weight": 0.5,
                                        "retain_replay_target": "answers",
                                        "retain_replay_pool": "whole"}
    with pytest.raises(ConfigError, match="unknown protection setting 'lots'"):
        parse_method("meft:64+retain:lots")
    # the deleted recipe's settings (row selection, penalty, hubs ...) are unknown now
    for bad in ("kl", "256", "all", "values", "frozen", "pen1", "hub0.5", "rep1.5", "rep-2",
                "repx", "repw0"):
        with pytest.raises(ConfigError, match="unknown protection setting"):
            parse_method(f"meft:64+retain:{bad}")
    compact = parse_method("meft:64:bf16:8bit+retain:rep2")
    assert compact.state == ("bf16", "8bit") and compact.retain
    assert compact.name == "meft:64:bf16:8bit+retain:rep2"
    assert compact.state_overrides() == {"host_dtype": "bfloat16", "optim_state": "8bit"}
    assert parse_method("meft:64:rowwise").state_overrides() == {"optim_state": "rowwise"}
    # default rates as the tuned comparison chose them
    assert parse_method("lora:all:16").default_lr == 3e-3
    assert parse_method("lora:all:64").default_lr == 1e-3
    # replay for every method; what only a sparse memory has is refused for the others
    assert parse_method("lora:all:16+retain").name == "lora:all:16+retain"
    assert parse_method("lora:all:16+retain").base_name == "lora:all:16"
    assert parse_method("full+retain:rep2:answers").retain_overrides() == {
        "retain_replay": 2, "retain_replay_target": "answers"}
    assert parse_method("dense:8+retain").name == "dense:8+retain"
    for bad in ("lora:16", "dense", "meft:big", "sparse:10", "lora:xy:4", "meft:0", "full:8",
                "meft:+retain", "meft:64:fp16", "meft:64:8bit:rowwise",
                "meft:64:bf16:bf16", "dense:64:bf16"):
        with pytest.raises(ConfigError, match="expected lora:qv:R"):
            parse_method(bad)


def test_parse_entry_gives_a_method_its_own_rates() -> None:
    assert parse_entry("meft:4096") == (Method("meft", neurons=4096), None)
    assert parse_entry("full@1e-4,3e-4") == (Method("full"), [1e-4, 3e-4])
    assert parse_entry("lora:all:16@3e-3") == (Method("lora", rank=16, targets="all"), [3e-3])
    for bad in ("meft:64@", "meft:64@0", "meft:64@1e-3,x", "full@-1e-3", "full@inf"):
        with pytest.raises(ConfigError, match="expected positive rates after @"):
            parse_entry(bad)
    with pytest.raises(ConfigError, match="expected lora:qv:R"):
        parse_entry("lora:16@1e-3")


KINDS = ["dense:32", "offload:32", "meft:64", "meft-noexperts:64", "full", "meft:64+retain",
         "meft:64+retain:rep2:answers", "full+retain:rep2"]
if importlib.util.find_spec("peft") is not None:
    KINDS += ["lora:qv:4", "lora:qv:4+retain"]


@pytest.mark.parametrize("name", KINDS)
def test_every_method_trains_on_a_tiny_model(name: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    base = tiny_for(tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    job = BenchJob.from_options({"steps": 3, "batch_size": 4, "top_k": 4, "n_probe": 2,
                                 "max_eval": 4, "max_new_tokens": 3, "progress": False})
    from meft.data.records import to_record
    from meft.evaluation.probe import RetentionProbe, general_loss

    probe = RetentionProbe([0, 1, 2], 215, general_loss(base, tokenizer),
                           [to_record(q) for q in ks.eval[:3]], [0, 1, 2], "eval")
    result = run_method(parse_method(name), base, tokenizer, train, ks.validation, ks.eval, job,
                        torch.device("cpu"), probe=probe, background=ks.eval,
                        seen=ks.eval_seen, facts={"facts": 12, "bits": ks.bits})
    assert result["method"] == name and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    kind = name.split("+")[0].split(":")[0]
    assert result["lr"] == {"lora": 3e-3, "full": 3e-4}.get(kind, 3e-3)
    assert result["train_config"]["retain"] == ("on" if "+retain" in name else "off")
    if "+retain" in name:  # every protected method replays (rep2: two examples per step)
        assert result["train_config"]["retain_replay"] == (2 if "rep2" in name else 1)
    assert result["train_config"]["weight_decay"] == 0.0  # the loop's, not torch's default
    assert result["validation_n"] == result["test_n"] == result["seen_n"] == 4
    assert result["facts"] == 12 and 0 <= result["seen_em"] <= 1
    assert 0 <= result["bits_recalled"] <= sum(ks.bits[s.source] for s in ks.eval_seen[:4])
    assert result["bits_per_param"] == result["bits_recalled"] / result["trainable_params"]
    if kind.startswith("meft"):  # how much general text reaches the rows it wrote
        assert 0 < result["written_rows"] <= 1 and 0 <= result["untouched_tokens"] <= 1
        assert 0 <= result["exact_windows"] <= 1
        # and how many of the probe's kept questions (3 here; no adjacent ones)
        assert result["exact_questions"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert result["exact_questions_adjacent"] is None
    else:
        assert result["written_rows"] is result["untouched_tokens"] is None
        assert result["exact_questions"] is None
    assert 0 <= result["validation_em"] <= 1 and 0 <= result["test_em"] <= 1
    assert result["retention"] in (0.0, 1 / 3, 2 / 3, 1.0) and result["probe"] == "eval"
    assert result["retention_seen_kinds"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert result["general_loss_delta"] != 0.0  # every method changed the model somewhat
    d, layers = 32, 2
    if name.startswith("offload"):
        assert result["moved_bytes_per_step"] == 4 * 32 * d * 4 * layers
        assert result["trainable_params"] == 2 * 32 * d * layers
    elif name.startswith("dense"):
        assert result["trainable_params"] == 2 * 32 * d * layers
        assert result["device_bytes_trainable"] == 4 * 2 * 32 * d * layers * 4
    elif kind == "full":  # every base weight trains: + gradients and two moments on device
        n_base = sum(p.numel() for p in base.parameters())
        assert result["trainable_params"] == n_base
        assert result["device_bytes_trainable"] == 3 * 4 * n_base
        assert result["device_bytes_base"] == 4 * n_base
    elif name.startswith("meft"):
        assert result["moved_bytes_per_step"] > 0 and result["union_mean"] > 0
        assert result["adapter_config"]["neurons"] == 64
        assert (result["retained_rows_mean"] is None) == ("+retain" not in name)
        if name.endswith("answers"):
            assert result["train_config"]["retain_replay_target"] == "answers"
    else:
        assert result["moved_bytes_per_step"] == 0
    assert result["device_bytes"] >= result["device_bytes_base"]
    assert "| " + name + " |" in markdown_table([result])
    # the base model given was copied, not trained
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_eval_every_records_the_validation_curve_without_changing_training(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    base = tiny_for(tokenizer)
    runs = {}
    for every in (0, 2):
        job = BenchJob.from_options({"steps": 5, "batch_size": 4, "top_k": 4, "n_probe": 2,
                                     "eval_every": every, "progress": False,
                                     "eval": False})
        runs[every] = run_method(parse_method("meft:64"), base, tokenizer, train,
                                 ks.validation, ks.eval, job, torch.device("cpu"))
    assert runs[0]["validation_losses"] == []
    curve = runs[2]["validation_losses"]
    assert [step for step, _ in curve] == [2, 4, 5]  # every 2 steps and at the end
    assert all(math.isfinite(loss) and loss > 0 for _, loss in curve)
    assert runs[2]["losses"] == runs[0]["losses"]  # evaluating does not perturb training


@pytest.mark.slow
def test_bench_end_to_end_and_equal_to_meft_train(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Three methods, JSON per run, summary and table; meft:64's losses are those of meft
    train --retain off, meft:64+retain's those of meft train's default protection."""
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--top-k", "4",
              "--experts", "8", "--n-probe", "2", "--no-progress"]
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "meft:64", "dense:32", "meft:64+retain", "--no-eval",
                 "--output", str(out), *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "dense_32@0.003.json", "meft_64+retain@0.003.json", "meft_64@0.003.json",
        "step_time_vs_n.png", "summary.json", "table.md"]
    table = (out / "table.md").read_text()
    assert "| meft:64 | 0.003 |" in table and "| dense:32 | 0.003 |" in table
    assert "command: meft bench --methods meft:64 dense:32 meft:64+retain --no-eval" in table
    bench = json.loads((out / "meft_64@0.003.json").read_text())
    assert bench["config"]["bench"]["steps"] == 3 and bench["environment"]["torch"]
    assert bench["adapter_config"]["experts"] == 8 and len(bench["losses"]) == 3
    assert bench["selected"] is True and bench["lr_at_grid_edge"] is None and bench["seed"] == 0
    assert bench["facts"] == 120 and bench["seen_em"] is None  # --no-eval: nothing asked
    # continue the comparison with seeds: the runs already there are not run again
    capsys.readouterr()
    assert main(["bench", "--methods", "meft:64", "--no-eval", "--output", str(out),
                 "--skip-done", "--seeds", "0,1", *common]) == 0
    err = capsys.readouterr().err
    assert "bench [2/2]: meft:64, lr 0.003, seed 1" in err and err.count("skipped") == 0
    assert main(["bench", "--methods", "meft:64", "--no-eval", "--output", str(out),
                 "--skip-done", "--seeds", "0,1", *common]) == 0
    assert capsys.readouterr().err.count("skipped (--skip-done)") == 2
    seeded = [json.loads((out / f"meft_64@0.003@seed{s}.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in seeded] == [0, 1] and seeded[0]["losses"] == bench["losses"]
    assert seeded[1]["losses"] != bench["losses"]  # another seed: other facts, order, init

    run = tmp_path / "train"
    assert main(["train", "--neurons", "64", "--output", str(run), "--no-eval-before",
                 "--max-eval", "2", "--max-new-tokens", "2", "--no-plots", "--no-retention",
                 "--retain", "off", *common]) == 0
    trained = json.loads((run / "run.json").read_text())
    assert trained["losses"] == bench["losses"]  # the same loop, bit for bit
    assert bench["train_config"]["retain"] == "off"
    protected = json.loads((out / "meft_64+retain@0.003.json").read_text())
    assert main(["train", "--neurons", "64", "--output", str(tmp_path / "default"),
                 "--no-eval-before", "--max-eval", "2", "--max-new-tokens", "2", "--no-plots",
                 "--no-retention", *common]) == 0
    default = json.loads((tmp_path / "default" / "run.json").read_text())
    assert default["config"]["train"]["retain"] == "on"
    assert default["losses"] == protected["losses"]
    # the protection ran: a replayed question per step (its effect on the new data's loss
    # can take more than 3 steps of a tiny model to show)
    metrics = [json.loads(x) for x in (tmp_path / "default" / "metrics.jsonl").read_text()
               .splitlines()]
    assert len(metrics) == 3 and all("retain_replay_loss" in r for r in metrics)
    from safetensors.torch import load_file

    off = load_file(run / "adapter" / "adapter_model.safetensors")
    on = load_file(tmp_path / "default" / "adapter" / "adapter_model.safetensors")
    assert off.keys() == on.keys() and any(not torch.equal(off[k], on[k]) for k in off)
    assert trained["config"]["adapter"] == {**bench["adapter_config"],
                                            "base_model": trained["config"]["adapter"][
                                                "base_model"]}

    # an existing output is refused, unless --overwrite: then runs are added, others kept
    capsys.readouterr()
    again = ["bench", "--methods", "meft-noexperts:64", "--no-eval", "--output", str(out),
             *common]
    assert main(again) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in ("meft:64", "dense:32", "meft-noexperts:64"))
    table = (out / "table.md").read_text()  # both invocations that made its runs
    assert "command: meft bench --methods meft:64 dense:32" in table
    assert "command: meft bench --methods meft-noexperts:64" in table
    assert "Runs made on:" in table and "meft-noexperts:64@0.003" in table

    # --report-only rebuilds the summary and table from the run files alone, training nothing
    summary = (out / "summary.json").read_text()
    runs = {p.name: p.stat().st_mtime_ns for p in out.glob("*@*.json")}
    (out / "summary.json").unlink()
    (out / "table.md").unlink()
    assert main(["bench", "--report-only", "--output", str(out)]) == 0
    assert (out / "summary.json").read_text() == summary
    rebuilt = (out / "table.md").read_text()
    assert rebuilt.split("Each method")[1] == table.split("Each method")[1]
    assert "command: meft bench --report-only" in rebuilt
    assert sorted(runs) == sorted(p.name for p in out.glob("*@*.json"))
    assert "WARNING: these runs come from different CPUs" not in rebuilt
    # one run made with another thread count: its step time is not comparable, and it says so
    one = out / "dense_32@0.003.json"
    moved = json.loads(one.read_text())
    moved["environment"]["threads"] = 1 if moved["environment"]["threads"] != 1 else 2
    one.write_text(json.dumps(moved))
    assert main(["bench", "--report-only", "--output", str(out)]) == 0
    warned = (out / "table.md").read_text()
    assert "WARNING: these runs come from different CPUs or thread counts" in warned
    assert f"{moved['environment']['threads']} thread" in warned
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "--report-only", "--output", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-only needs --output DIR holding run files" in err[0]


@pytest.mark.slow
def test_bench_retain_method_equals_meft_train_with_protection(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--top-k", "4",
              "--experts", "8", "--n-probe", "2", "--no-progress", "--retain-replay", "2",
              "--retain-replay-target", "answers"]
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "meft:64+retain", "--no-eval", "--output", str(out),
                 *common]) == 0
    bench = json.loads((out / "meft_64+retain@0.003.json").read_text())
    assert bench["method"] == "meft:64+retain" and bench["retained_rows_mean"] > 0
    assert bench["train_config"]["retain_replay_target"] == "answers"
    run = tmp_path / "train"
    assert main(["train", "--neurons", "64", "--retain", "on", "--output", str(run),
                 "--no-eval-before", "--max-eval", "2", "--max-new-tokens", "2", "--no-plots",
                 "--no-retention", *common]) == 0
    trained = json.loads((run / "run.json").read_text())
    assert trained["losses"] == bench["losses"]  # the same protection, bit for bit


def test_bench_compact_method_equals_meft_train_with_compact_state(
        model_dir: Path, tmp_path: Path) -> None:
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--top-k", "4",
              "--experts", "8", "--n-probe", "2", "--no-progress"]
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "meft:64", "meft:64:bf16:8bit", "--no-eval", "--output",
                 str(out), *common]) == 0
    bench = json.loads((out / "meft_64_bf16_8bit@0.003.json").read_text())
    fp32 = json.loads((out / "meft_64@0.003.json").read_text())
    assert bench["method"] == "meft:64:bf16:8bit" and bench["losses"] != fp32["losses"]
    assert bench["host_state_bytes"] < fp32["host_state_bytes"] / 2.5  # 12 -> ~4 B/param
    table = (out / "table.md").read_text()
    assert "PASS" not in table and "target" not in table  # no tracker targets in the product
    run = tmp_path / "train"
    assert main(["train", "--neurons", "64", "--host-dtype", "bfloat16", "--optim-state", "8bit",
                 "--output", str(run), "--no-eval-before", "--max-eval", "2",
                 "--max-new-tokens", "2", "--no-plots", "--no-retention", "--retain", "off",
                 *common]) == 0
    trained = json.loads((run / "run.json").read_text())
    assert trained["losses"] == bench["losses"]  # the same compact state, bit for bit


@pytest.mark.slow
def test_lr_grid_chooses_on_validation_and_never_on_test(model_dir: Path, tmp_path: Path
                                                         ) -> None:
    """The same comparison on the user's data twice: once with the true test answers, once
    with every test answer replaced by a wrong one. Validation scores and the chosen rates
    must not move; only the reported test scores may."""
    rows = [{"question": f"Where was person {i} born?", "answer": [f"Teluvia{i % 3}"]}
            for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({**r, "question": f"Person {i}'s birthplace?"}) + "\n"
                           for i, r in enumerate(rows[:6])))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({**r, "question": f"Birthplace of person {i}?"}) + "\n"
                            for i, r in enumerate(rows[:6])))
    poisoned = tmp_path / "poisoned.jsonl"
    poisoned.write_text("".join(json.dumps({"question": f"Birthplace of person {i}?",
                                            "answer": ["Nowhere"]}) + "\n"
                                for i in range(6)))
    summaries = []
    for name, test_file in (("true", test), ("poisoned", poisoned)):
        out = tmp_path / name
        assert main(["bench", "--methods", "meft:64", "dense:32@1e-3,3e-2", "--model",
                     str(model_dir),
                     "--data", str(data), "--validation-data", str(val), "--eval-data",
                     str(test_file), "--lr-grid", "1e-3,3e-2,3e-1", "--steps", "4",
                     "--batch-size", "4", "--top-k", "4", "--experts", "8", "--n-probe", "2",
                     "--max-new-tokens", "3", "--no-progress", "--output", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
        assert len(list(out.glob("*@*.json"))) == 5  # meft: the grid's 3; dense: its own 2
        assert (out / "em_vs_lr.png").is_file()
    true, poisoned_rows = summaries
    from meft.cli.bench.report import SUMMARY_FIELDS

    assert all(tuple(row) == SUMMARY_FIELDS for row in true)
    assert [r["method"] for r in true] == ["dense:32", "meft:64"] or \
        [r["method"] for r in true] == ["meft:64", "dense:32"]
    for a, b in zip(true, poisoned_rows, strict=True):
        assert (a["method"], a["lr"], a["validation_em"]) == (b["method"], b["lr"],
                                                              b["validation_em"])
        assert b["test_em"] == 0.0  # nobody answers "Nowhere"
        assert a["lr_grid"] == ([1e-3, 3e-2, 3e-1] if a["method"] == "meft:64"
                                else [1e-3, 3e-2]) and a["selected"] is True
        assert a["retention"] is None  # the random tiny model answers no general question


def test_selection_looks_at_validation_only() -> None:
    from meft.cli.bench.report import select

    def run(lr: float, val: float, test: float) -> dict:
        return {"method": "m", "lr": lr, "validation_em": val, "validation_f1": val,
                "test_em": test, "final_loss": 1.0}

    runs = [run(1e-3, 0.2, 0.9), run(3e-3, 0.6, 0.1), run(1e-2, 0.5, 0.8)]
    (chosen,) = select(runs)
    assert chosen["lr"] == 3e-3 and chosen["lr_at_grid_edge"] is None
    assert [r["selected"] for r in runs] == [False, True, False]
    runs[0]["validation_em"] = 0.7
    assert select(runs)[0]["lr_at_grid_edge"] == "lowest"


def _seed_run(method: str, lr: float, seed: int, val: float, ret: float,
              loss: float = 0.01) -> dict:
    return {"method": method, "kind": method, "lr": lr, "seed": seed, "validation_em": val,
            "validation_f1": val, "test_em": val - 0.05, "final_loss": 1.0, "retention": ret,
            "retention_seen_kinds": ret + 0.1, "general_loss_delta": loss, "step_time_s": 1.0,
            "tokens_per_s": 500.0, "device_bytes": 1e6, "host_bytes": 2e6,
            "moved_bytes_per_step": 0.0, "trainable_params": 10}


def test_seeds_give_means_and_spreads_and_choose_by_the_mean(tmp_path: Path) -> None:
    """Per (method, rate): the mean and sample standard deviation of every quality field over
    its seeds; the rate is chosen by the mean validation EM, not by one lucky seed."""
    import statistics

    from meft.cli.bench.report import aggregate, select, write_report

    runs = [_seed_run("m", 1e-3, 0, 0.50, 0.9), _seed_run("m", 1e-3, 1, 0.60, 0.8),
            _seed_run("m", 1e-3, 2, 0.70, 0.7),
            _seed_run("m", 3e-3, 0, 0.95, 0.2), _seed_run("m", 3e-3, 1, 0.30, 0.3),
            _seed_run("m", 3e-3, 2, 0.35, 0.4)]  # one lucky seed at 3e-3
    rows = aggregate(runs)
    assert [(r["lr"], r["seeds"]) for r in rows] == [(1e-3, [0, 1, 2]), (3e-3, [0, 1, 2])]
    assert rows[0]["validation_em"] == pytest.approx(0.6)
    assert rows[0]["validation_em_std"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert rows[0]["retention_seen_kinds"] == pytest.approx(0.9)
    (chosen,) = select(rows)
    assert chosen["lr"] == 1e-3  # mean 0.60 against 0.533
    assert [r["selected"] for r in runs] == [True] * 3 + [False] * 3
    assert aggregate(runs[:1])[0]["validation_em_std"] is None  # one seed: no spread
    for r in runs:  # as run files of --seeds
        (tmp_path / f"m@{r['lr']:g}@seed{r['seed']}.json").write_text(json.dumps(r))
    report = write_report(tmp_path)
    (row,) = report["summary"]
    assert row["lr"] == 1e-3 and row["seeds"] == [0, 1, 2]
    assert row["test_em"] == pytest.approx(0.55) and row["retention_std"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "seeds 0,1,2" in table and "55.0 ± 10.0" in table
    assert json.loads((tmp_path / "m@0.001@seed1.json").read_text())["selected"] is True
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_matched_learning_picks_the_least_forgetting_rate_that_learns_enough(
        tmp_path: Path) -> None:
    """At a level of validation EM (default 90% of the best), each method's rate that
    forgets least among those reaching it; a method none of whose rates reach it says so."""
    from meft.cli.bench.report import aggregate, matched, write_report

    runs = [_seed_run("a", 1e-3, 0, 0.80, 0.9), _seed_run("a", 3e-3, 0, 1.00, 0.1),
            _seed_run("b", 1e-4, 0, 0.92, 0.5), _seed_run("b", 3e-4, 0, 0.95, 0.6),
            _seed_run("c", 1e-3, 0, 0.50, 1.0)]
    level, rows = matched(aggregate(runs))
    assert level == pytest.approx(0.9)
    picked = {r["method"]: (r["reached"], r["lr"]) for r in rows}
    # a's 1e-3 forgets least but learns 0.80 < 0.9; b's 3e-4 reaches it and keeps more
    assert picked == {"a": (True, 3e-3), "b": (True, 3e-4), "c": (False, None)}
    level, rows = matched(aggregate(runs), 0.75)
    assert {r["method"]: r["lr"] for r in rows}["a"] == 1e-3
    for r in runs:
        (tmp_path / f"{r['method']}@{r['lr']:g}.json").write_text(json.dumps(r))
    write_report(tmp_path, matched_em=0.75)
    saved = json.loads((tmp_path / "matched.json").read_text())
    assert saved["validation_em_target"] == 0.75 and not saved["default_target"]
    assert "| c | does not reach 75.0 |" in (tmp_path / "table.md").read_text()


def test_lr_grid_refusals(capsys: pytest.CaptureFixture[str], data_file: Path) -> None:
    assert main(["bench", "--data", str(data_file), "--lr-grid", "1e-3,1e-2"]) == 2
    assert "--lr-grid and method@rates need validation questions" in capsys.readouterr().err
    assert main(["bench", "--data", str(data_file), "--methods", "meft:64@1e-3,3e-3"]) == 2
    assert "need validation questions" in capsys.readouterr().err
    assert main(["bench", "--lr", "1e-3", "--methods", "meft:64@1e-3"]) == 2
    assert "--lr and meft:64@1e-3: give one" in capsys.readouterr().err
    assert main(["bench", "--methods", "meft:64@fast"]) == 2
    assert ("method 'meft:64@fast': expected positive rates after @, like meft:64@1e-3,3e-3"
            in capsys.readouterr().err)
    assert main(["bench", "--lr", "1e-3", "--lr-grid", "1e-3,1e-2"]) == 2
    assert "--lr and --lr-grid" in capsys.readouterr().err
    assert main(["bench", "--lr-grid", "1e-3,-1"]) == 2
    assert ("--lr-grid must be a list of numbers, each positive, got [0.001, -1.0]"
            in capsys.readouterr().err)


def test_bench_refuses_bad_methods_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--methods", "meft:64", "lora:16"]) == 2
    assert "method 'lora:16'" in capsys.readouterr().err
    assert main(["bench", "--methods", "meft:64", "--top-k", "99", "--experts", "8",
                 "--n-probe", "2"]) == 2
    assert "--top-k 99 must be in" in capsys.readouterr().err  # the flag, not the field
    # a job-wide flag of the sparse memory's protection, refused for LoRA before any work
    assert main(["bench", "--methods", "meft:4096+retain", "lora:qv:4+retain",
                 "--retain-written", "keep"]) == 2
    err = capsys.readouterr().err
    assert "lora:qv:4+retain: --retain-written is protection only meft's sparse tables" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_worker_reports_a_user_error_in_one_line(model_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """A run that stops on the user's input (here a bad line in its data) says so in one line
    and exits 2, as the CLI does; meft bench then skips it. No traceback."""
    from meft.cli.bench.run import main as worker_main
    from meft.config import BenchJob

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "Q?", "answer": "A"}\n{"question": 3}\n')
    for name in ("validation", "test"):
        (data / f"{name}.jsonl").write_text("")
    job = BenchJob.from_options({"methods": ["meft:64"], "steps": 1, "progress": False})
    code = worker_main(["--method", "meft:64", "--model-dir", str(model_dir), "--job",
                        json.dumps(job.to_dict()), "--data", str(data), "--result",
                        str(tmp_path / "result.json")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "result.json").exists()
    ours = [line for line in err.splitlines() if line.startswith("meft:")]  # not the loading bar
    assert len(ours) == 1 and ours[0].startswith("meft: error: ") and "train.jsonl:2" in ours[0]
    assert "Traceback" not in err


def test_runs_from_before_the_probe_split_count_their_retention_as_seen_kinds() -> None:
    from meft.cli.bench.report import aggregate

    old = {"method": "meft:64", "lr": 3e-3, "step_time_s": 1.0, "tokens_per_s": 1.0,
           "validation_em": 0.5, "test_em": 0.5, "retention": 0.9}
    new = {**old, "lr": 1e-3, "retention": 0.8, "retention_seen_kinds": 0.95}
    rows = {r["lr"]: r for r in aggregate([old, new])}
    assert rows[3e-3]["retention"] is None and rows[3e-3]["retention_seen_kinds"] == 0.9
    assert rows[1e-3]["retention"] == 0.8 and rows[1e-3]["retention_seen_kinds"] == 0.95
    assert old["retention"] == 0.9  # the run file itself is not rewritten


def test_recalled_bits_count_the_exact_answers_only() -> None:
    from meft.cli.bench.run import recalled_bits

    ks = make_knowledge_set(4, seed=0)
    seen = ks.eval_seen[:3]
    predictions = [seen[0].answers[0], "nothing", f"{seen[2].answers[0]}."]
    assert recalled_bits(seen, predictions, ks.bits) == ks.bits[seen[0].source] + \
        ks.bits[seen[2].source]
    assert recalled_bits(seen, ["x"] * 3, ks.bits) == 0.0
