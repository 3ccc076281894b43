"""MeftTrainer (transformers.Trainer) against meft's own trainer; resume; clipping; TRL."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import TrainingArguments

from helpers import meft_config, tiny
from meft.adapter.model import MeftModel, get_meft_model, read_adapter
from meft.data.records import Encoded
from meft.training.integrations import MeftCollator, MeftTrainer, encoder
from meft.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def examples(n: int = 8, seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 97, (9,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * 3 + ids[3:], False))
    return out


def rows(data: list[Encoded]) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in data]


def hf_args(out: Path, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def nonzero_values(model: MeftModel) -> None:
    for s in model.stores:  # so keys and routers get gradients from the first step
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))


def test_losses_and_adapter_equal_meft_trains(tmp_path: Path) -> None:
    """Every step sees the whole dataset (batch 8 of 8), so the data order does not matter:
    the same model, data, rate, schedule and clipping give the same losses and tables."""
    data = examples()
    ours = get_meft_model(tiny("llama"), meft_config())
    nonzero_values(ours)
    history = Trainer(ours, data, TrainConfig(steps=4, batch_size=8, lr=1e-2,
                                              schedule="constant", warmup_ratio=0.0,
                                              progress=False),
                      tmp_path / "meft", pad_id=0).train().history

    theirs = get_meft_model(tiny("llama"), meft_config())
    nonzero_values(theirs)
    trainer = MeftTrainer(model=theirs, args=hf_args(tmp_path / "hf"),
                          train_dataset=rows(data), data_collator=MeftCollator(0))
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 4
    for mine, hf in zip(history, logged, strict=True):
        assert hf["loss"] == pytest.approx(mine["loss"], abs=1e-4)  # HF rounds to 4 places
        assert hf["grad_norm"] == pytest.approx(float(mine["grad_norm"]), rel=1e-4)
        assert hf["meft_union"] > 0 and hf["meft_mb_moved"] > 0
    for name, t in ours.adapter_state().items():
        torch.testing.assert_close(theirs.adapter_state()[name], t, rtol=1e-5, atol=1e-6)


def test_protection_in_the_trainer_equals_meft_trains(tmp_path: Path) -> None:
    """The same protection (replay, rows written before held) through MeftTrainer and
    through meft's trainer: the same losses and tables."""
    from meft.training.protection import Background, Retainer

    data = examples()
    background = examples(10, seed=5)

    def protected(model: MeftModel) -> Retainer:
        for s in model.stores:  # an adapter trained before: its first 8 rows hold values
            s.values[:8].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        bg = Background(len(background), background)
        bg.keep_distributions(model, pad_id=0)
        return Retainer(model, bg, replay=2)

    ours = get_meft_model(tiny("llama"), meft_config())
    retainer = protected(ours)
    nonzero_values(ours)
    history = Trainer(ours, data, TrainConfig(steps=3, batch_size=8, lr=1e-2,
                                              schedule="constant", warmup_ratio=0.0,
                                              progress=False),
                      tmp_path / "meft", pad_id=0, retainer=retainer).train().history
    theirs = get_meft_model(tiny("llama"), meft_config())
    retainer = protected(theirs)
    nonzero_values(theirs)
    routers = [r.detach().clone() for r in theirs.router_parameters()]
    held = [s.values[:8].clone() for s in theirs.stores]
    trainer = MeftTrainer(model=theirs, args=hf_args(tmp_path / "hf", max_steps=3),
                          train_dataset=rows(data), data_collator=MeftCollator(0),
                          retainer=retainer)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    for mine, hf in zip(history, logged, strict=True):
        assert hf["loss"] == pytest.approx(mine["loss"], abs=1e-4)
    for name, t in ours.adapter_state().items():
        torch.testing.assert_close(theirs.adapter_state()[name], t, rtol=1e-5, atol=1e-6)
    assert history[-1]["retain_replay_loss"] > 0
    assert all(not torch.equal(r, r0) for r, r0 in zip(theirs.router_parameters(), routers,
                                                       strict=True))  # routers train
    for s, before in zip(theirs.stores, held, strict=True):  # rows written before: as they were
        assert torch.equal(s.values[:8], before)


def test_resume_from_a_trainer_checkpoint_is_bitwise(tmp_path: Path) -> None:
    """5 steps in one go equal 4 steps (stopped, with checkpoints every 2 and only the newest
    kept) then a resume from checkpoint-4: linear schedule, gradient accumulation."""
    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == 4:
                control.should_training_stop = True

    def trainer(out: Path, **kw: object) -> MeftTrainer:
        model = get_meft_model(tiny("llama"), meft_config())
        return MeftTrainer(model=model, args=hf_args(out, per_device_train_batch_size=2,
                                                      gradient_accumulation_steps=2,
                                                      lr_scheduler_type="linear",
                                                      max_steps=5, **kw),
                           train_dataset=rows(examples(12)), data_collator=MeftCollator(0))

    whole = trainer(tmp_path / "whole")
    whole.train()
    stopped = trainer(tmp_path / "stopped", save_strategy="steps", save_steps=2,
                      save_total_limit=1)
    stopped.add_callback(StopAt4())
    stopped.train()
    assert [p.name for p in (tmp_path / "stopped").glob("checkpoint-*")] == ["checkpoint-4"]
    ckpt = tmp_path / "stopped" / "checkpoint-4"
    files = {p.name for p in ckpt.iterdir()}
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
            "scheduler.json", "trainer_state.json", "training_args.json"} <= files
    read_adapter(ckpt)  # what meft eval, generate and info read
    resumed = trainer(tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=True)
    for name, t in whole.model.adapter_state().items():
        assert torch.equal(resumed.model.adapter_state()[name], t), name


def test_clipping_covers_the_host_rows(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    trainer = MeftTrainer(model=model, args=hf_args(tmp_path), train_dataset=rows(examples()),
                          data_collator=MeftCollator(0))
    trainer.create_optimizer()
    router = model.router_parameters()[0]
    router.grad = torch.full_like(router, 1e-3)
    store = model.stores[0]
    store.value_grad.add(torch.tensor([3]), torch.full((1, 32), 1e4))  # one huge host row
    norm = float(trainer._clip_grad_norm(model))
    assert norm == pytest.approx(math.sqrt(router.numel() * 1e-6 + 32 * 1e8), rel=1e-6)
    after = math.sqrt(float(router.grad.double().pow(2).sum()) + float(
        store.value_grad.sq_norm()))
    assert after == pytest.approx(1.0, rel=1e-4)  # clipped to max_grad_norm, host included
    assert float(router.grad[0, 0]) < 1e-6  # the router's share shrank with the host's


def test_evaluation_during_training(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    trainer = MeftTrainer(model=model, args=hf_args(tmp_path, eval_strategy="steps",
                                                    eval_steps=2, max_steps=4,
                                                    per_device_eval_batch_size=4),
                          train_dataset=rows(examples()), eval_dataset=rows(examples(4, 1)),
                          data_collator=MeftCollator(0))
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert all(r["meft_union"] > 0 for r in train_logs)  # evaluation is not a step's traffic


def test_base_model_and_meft_config_and_misuse(tmp_path: Path) -> None:
    trainer = MeftTrainer(model=tiny("llama"), meft_config=meft_config(),
                          args=hf_args(tmp_path, max_steps=1), train_dataset=rows(examples()),
                          data_collator=MeftCollator(0))
    assert isinstance(trainer.model, MeftModel)
    trainer.train()
    assert any(s.values.abs().sum() > 0 for s in trainer.model.stores)
    quantized = tiny("llama")
    quantized.is_quantized = True  # as a GGUF-loaded model is marked
    MeftTrainer(model=quantized, meft_config=meft_config(), args=hf_args(tmp_path),
                train_dataset=rows(examples()), data_collator=MeftCollator(0))
    with pytest.raises(TypeError, match="needs a MeftModel"):
        MeftTrainer(model=tiny("llama"), args=hf_args(tmp_path))
    with pytest.raises(TypeError, match="already wrapped"):
        MeftTrainer(model=trainer.model, meft_config=meft_config(), args=hf_args(tmp_path))


def test_encoder_matches_meft_train_encoding(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from meft.data.records import encode, parse_record

    record = {"question": "Where was Ada born?", "answer": ["London"]}
    got = encoder(tokenizer, 64)(record)
    want = encode(parse_record(record, "x"), tokenizer, 64)
    assert got == {"input_ids": want.input_ids, "labels": want.labels}


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL not installed")
def test_trl_sft_trainer_with_the_mixin(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import Dataset

    from helpers import tiny_for
    from meft.training.integrations import sft_trainer

    model = get_meft_model(tiny_for(tokenizer), meft_config())
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Where is item {i}?"}],
                               "completion": [{"role": "assistant",
                                               "content": f"Teluvia{i}"}]}
                              for i in range(8)])
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                     learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps",
                     save_steps=2, logging_steps=1, disable_tqdm=True)
    trainer = sft_trainer(model=model, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    assert type(trainer).__name__ == "MeftSFTTrainer"
    assert any(s.values.abs().sum() > 0 for s in model.stores)
    read_adapter(tmp_path / "checkpoint-2")


@pytest.mark.slow
def test_the_example_script_runs(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    """In RAM and with --store (the same scores); the disk run's adapter names its store."""
    results = []
    for extra in ([], ["--store", str(tmp_path / "store")]):
        out = tmp_path / f"run{len(extra)}"
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"),
                               "--model", str(model_dir), "--data", str(data_file),
                               "--eval-data", str(data_file), "--max-steps", "2",
                               "--output", str(out), "--neurons", "64", "--top-k", "4",
                               "--experts", "8", "--n-probe", "2", *extra],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert 0 <= results[-1]["exact_match"] <= 1 and results[-1]["n"] == 12
        config, tensors = read_adapter(out / "adapter")
        assert config.neurons == 64
        assert (config.tables_step, len(tensors)) == ((2, 2) if extra else (None, 6))  # 2 layers
    assert results[0] == results[1]


def test_refused_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' DDP would train unsharded copies of the tables that drift apart."""
    from meft.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun -m meft train"):
        MeftTrainer(tiny("llama"), meft_config=meft_config(),
                    args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_a_disk_store_trains_as_in_ram_and_resumes_after_a_crash(tmp_path: Path) -> None:
    """Tables and moments in a disk store: the same adapter, bit for bit, as in RAM. Stopped
    after step 5 with checkpoints at 2 and 4 (the crash: step 5 was never saved), the store
    reopens at step 4 and a resume from checkpoint-4 ends where the uninterrupted run does;
    the saved adapter names the store and loads from it."""
    from transformers import TrainerCallback

    from meft.engine.disk import DiskArrays
    from meft.errors import ConfigError, SerializationError

    class StopAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == 5:
                control.should_training_stop = True

    store = tmp_path / "store"

    def trainer(out: Path, arrays: DiskArrays | None, **kw: object) -> MeftTrainer:
        model = get_meft_model(tiny("llama"), meft_config(), arrays=arrays)
        args = hf_args(out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       lr_scheduler_type="linear", max_steps=6, **kw)
        return MeftTrainer(model=model, args=args, train_dataset=rows(examples(12)),
                           data_collator=MeftCollator(0))

    whole = trainer(tmp_path / "ram", None)
    whole.train()
    first = trainer(tmp_path / "run", DiskArrays(store), save_strategy="steps", save_steps=2)
    first.add_callback(StopAt5())
    arrays, released = first.model.arrays, []
    release = arrays.release
    arrays.release = lambda: (released.append(1), release())[1]  # type: ignore[method-assign]
    first.train()
    assert len(released) == 5 + 2  # after each step and each commit: one step resident
    ckpt = tmp_path / "run" / "checkpoint-4"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["tables_store"] == str(store.resolve()) and config["tables_step"] == 4
    _, saved = read_adapter(ckpt)
    assert saved and all(name.endswith(".router") for name in saved)  # the tables stay
    assert first.model.arrays.step == 4
    del first

    with pytest.raises(ConfigError, match="holds step 4 of an earlier run"):
        trainer(tmp_path / "run", DiskArrays(store)).train()  # not resumed: refused
    stale = trainer(tmp_path / "run", DiskArrays(store))
    with pytest.raises(SerializationError, match="holds step 4; resume from checkpoint-4"):
        stale.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    reopened = DiskArrays(store)
    assert reopened.step == 4  # step 5 and the failed resume's work undone
    resumed = trainer(tmp_path / "run", reopened, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for name, t in whole.model.adapter_state().items():
        assert torch.equal(resumed.model.adapter_state()[name], t), name
    resumed.save_model(str(tmp_path / "final"))  # what meft eval --adapter reads
    assert resumed.model.arrays.step == 6
    loaded = MeftModel.from_pretrained(tiny("llama"), tmp_path / "final")
    for name, t in whole.model.adapter_state().items():
        assert torch.equal(loaded.adapter_state()[name], t), name

    model = get_meft_model(tiny("llama"), meft_config(), arrays=DiskArrays(tmp_path / "s2"))
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        MeftTrainer(model=model, args=hf_args(tmp_path / "best", save_strategy="steps",
                                              eval_strategy="steps",
                                              load_best_model_at_end=True),
                    train_dataset=rows(examples()), eval_dataset=rows(examples(2)),
                    data_collator=MeftCollator(0))
