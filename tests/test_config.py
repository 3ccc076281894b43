"""config.py is the one home of every default: the CLI, YAML files, run directories and
--resume all go through it."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from meft.cli.commands import build_parser, main
from meft.config import (
    BenchJob,
    ConfigError,
    MeftConfig,
    RunConfig,
    TrainConfig,
    TrainJob,
    cli_fields,
    flag_of,
)

# a run_config.json as meft 0.1.0 wrote it (flat CLI options)
LEGACY_RUN_CONFIG = {
    "model": None, "data": None, "eval_data": None, "output": "runs/x", "steps": 90,
    "epochs": 3.0, "batch_size": 12, "micro_batch_size": None, "neurons": 4096, "top_k": 64,
    "experts": None, "probe": 8, "gate": "product", "layers": None, "lr": 0.003,
    "router_lr": None, "weight_decay": 0.0, "warmup_ratio": 0.02, "max_grad_norm": 1.0,
    "max_length": 256, "seed": 0, "eval_every": 0, "save_every": 0, "keep_checkpoints": 2,
    "max_new_tokens": 16, "eval_batch_size": 32, "max_eval": None, "eval_before": True,
    "device": None, "overwrite": False, "trust_remote_code": False, "progress": True,
    "plots": True}


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())  # type: ignore[union-attr]


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_setting_has_a_flag_whose_help_shows_the_dataclass_default(command: str) -> None:
    text = _help(command)
    job = TrainJob if command == "train" else BenchJob
    for section in job.SECTIONS:
        for f in section.fields():
            assert flag_of(f) in text, f.name
            if f.metadata["default_text"] is not None:
                shown = " ".join(str(f.metadata["default_text"]).split())
            elif isinstance(f.default, bool) and f.default:  # a --no-... flag
                help_text = " ".join(str(f.metadata["help"]).split())
                assert f"turn off: {help_text} (on by default)" in text, f.name
                continue
            elif isinstance(f.default, bool):
                shown = "off"
            elif isinstance(f.default, float):
                shown = f"{f.default:g}"
            else:
                shown = str(f.default)
            assert f"(default: {shown})" in text, (f.name, shown)


def test_the_parser_adds_no_defaults_of_its_own() -> None:
    args = build_parser().parse_args(["train"])
    assert {k for k in vars(args) if k != "config"} == {"command"}
    job = TrainJob.from_options({})
    assert job.adapter == MeftConfig() and job.train == TrainConfig() and job.run == RunConfig()


def test_flag_names_and_field_names_are_both_accepted() -> None:
    a = TrainJob.from_options({"probe": 4, "top-k": 16, "layers": "1-3", "lr": "1e-3"})
    b = TrainJob.from_options({"n_probe": 4, "top_k": 16, "layers": [1, 2, 3], "lr": 1e-3})
    assert a == b and a.adapter.n_probe == 4 and a.train.lr == 1e-3
    # probe: an integer is P (its flag until --probe FILE took the name), text a file
    mine = TrainJob.from_options({"probe": "mine.jsonl", "n-probe": 4})
    assert mine.run.probe == "mine.jsonl" and mine.adapter.n_probe == 4
    assert a.adapter.seed == a.train.seed  # one seed
    with pytest.raises(ConfigError, match="unknown key 'nprobe'"):
        TrainJob.from_options({"nprobe": 4})


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
    ({"warmup_ratio": 1}, "warmup_ratio must be a number in [0, 1), got 1"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
    ({"gate": "max"}, "gate must be one of product, none, got 'max'"),
    ({"eval_before": "yes"}, "eval_before must be true or false, got 'yes'"),
    ({"layers": []}, "layers must be a list of integers, got []"),
    ({"layers": "a-b"}, "layers: expected ids like 0,1,2 or a range like 10-29"),
    ({"train_phrasings": 4}, "--train-phrasings must be 1, 2 or 3"),
])
def test_bad_values_name_the_field_and_the_value(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainJob.from_options(options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_recorded_job_round_trips_and_legacy_run_config_still_reads() -> None:
    job = TrainJob.from_options({"neurons": 1024, "lr": 1e-3, "layers": [0, 2]})
    again = TrainJob.from_dict(json.loads(json.dumps(job.to_dict())), source="x")
    assert again == job
    assert job.to_dict()["adapter"]["experts"] == 128  # resolved, not null
    legacy = TrainJob.from_dict(LEGACY_RUN_CONFIG, source="run_config.json")
    assert legacy.adapter.experts == 256 and legacy.train.steps == 90
    assert legacy.adapter.n_probe == 8 and legacy.run.output == "runs/x"


def test_resume_compares_resolved_values() -> None:
    job = TrainJob.from_options({"neurons": 4096, "steps": 10})
    same = job.resume({"experts": 256, "neurons": 4096, "steps": 20, "device": "cpu"},
                      source="run")  # E=256 is what the run resolved to: not a change
    assert same.train.steps == 20 and same.run.device == "cpu" and same.adapter == job.adapter
    with pytest.raises(ConfigError, match=r"--lr 0\.1 \(the run has 0\.003\)"):
        job.resume({"lr": 0.1}, source="run")
    with pytest.raises(ConfigError, match=r"--experts 128 \(the run has 256\)"):
        job.resume({"experts": 128}, source="run")


def test_bench_job_shares_the_training_defaults() -> None:
    job = BenchJob.from_options({"methods": ["meft:1024"], "quick": True})
    assert job.bench.steps == 20 and job.run.max_eval == 24
    meft = job.train_config(TrainConfig.lr)
    assert (meft.lr, meft.weight_decay, meft.warmup_ratio) == (3e-3, 0.0, 0.02)
    assert job.train_config(1e-3).lr == 1e-3
    assert BenchJob.from_options({"lr": 0.01}).train_config(1e-3).lr == 0.01
    assert job.adapter_config(1024) == MeftConfig(neurons=1024)
    assert {f.name for f in cli_fields(MeftConfig)} - {"neurons"} <= {
        f.name for s in BenchJob.SECTIONS for f in s.fields()}


def test_run_directory_records_the_resolved_config(model_dir: Path, data_file: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data_file), "--output",
                 str(out), "--steps", "1", "--no-progress", "--no-plots", "--no-eval-before",
                 "--max-new-tokens", "2", "--neurons", "64", "--top-k", "4", "--n-probe",
                 "2"]) == 0
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["adapter"]["experts"] == 32  # resolved from N=64
    assert recorded["train"] == {f.name: getattr(TrainConfig(steps=1, progress=False), f.name)
                                 for f in fields(TrainConfig)}
    final = json.loads((out / "run.json").read_text())["config"]
    filled = ("base_model", "hidden_size", "num_layers")  # known once the model is attached
    assert final["train"] == recorded["train"] and final["run"] == recorded["run"]
    assert final["adapter"]["hidden_size"] == 32 and final["adapter"]["num_layers"] == 2
    assert {k: v for k, v in final["adapter"].items() if k not in filled} == {
        k: v for k, v in recorded["adapter"].items() if k not in filled}


def test_python_names_are_the_flag_names() -> None:
    """Every option a user sets has one name: the Python keyword is the flag without its
    dashes (booleans on by default: --no-<name>), and renamed fields still load."""
    from meft.config import (
        BenchConfig,
        EvalConfig,
        GenerateConfig,
        MeftConfig,
        PlanConfig,
        RunConfig,
        TrainConfig,
        cli_fields,
        flag_of,
    )

    for cls in (MeftConfig, TrainConfig, RunConfig, EvalConfig, GenerateConfig, PlanConfig,
                BenchConfig):
        for f in cli_fields(cls):
            flag = flag_of(f)
            assert flag in ("--" + f.name.replace("_", "-"),
                            "--no-" + f.name.replace("_", "-")), (cls.__name__, f.name, flag)
    assert MeftConfig(host_dtype="bfloat16").dtype == torch.bfloat16
    assert MeftConfig.from_dict({"storage_dtype": "bfloat16"}).host_dtype == "bfloat16"
