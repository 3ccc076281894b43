"""Bad input costs one clear line and a non-zero exit, never a traceback or a run.

One test per case of issue 5, through the CLI as a user meets them, plus property-based tests
of config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TINY
from meft.cli.commands import main
from meft.config import ConfigError, MeftConfig

FAST = ["--no-progress", "--no-plots", "--no-eval-before", "--max-new-tokens", "2"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("meft: error:")]
    assert len(errors) == 1, err
    return errors[0]


def train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--steps", "2", "--batch-size", "2", *FAST, *TINY, *extra]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"question": "a", "answer": "b"}\n{"question": "c", "answer":\n', ":2: invalid JSON"),
        (b'{"question": "a"}\n', ':1: field "answer" is missing'),
        (b'{"question": "a", "answer": 5}\n', ':1: field "answer"'),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', ":1:"),
        (b"\n\n", "no examples"),
        (b'{"question": "a", "answer": "b\xff"}\n', ":1: not valid UTF-8"),
        (b'[1, 2]\n', ":1:"),
    ],
    ids=["malformed", "missing-field", "wrong-type", "no-assistant", "empty", "non-utf8",
         "not-object"],
)
def test_bad_data_file(content: bytes, needle: str, model_dir: Path,
                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    code, err = run(train(model_dir, bad, tmp_path / "run"), capsys)
    assert code == 2
    line = one_error(err)
    assert "bad.jsonl" in line and needle in line


def test_absurdly_long_example_is_truncated_with_a_warning(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = data_file.read_text() + json.dumps(
        {"question": "why " * 5000, "answer": "because"}) + "\n"
    data = tmp_path / "long.jsonl"
    data.write_text(rows)
    code, err = run(train(model_dir, data, tmp_path / "run", "--max-length", "48"), capsys)
    assert code == 0
    assert "truncated" in err


def test_missing_model_path(data_file: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(train(tmp_path / "nope", data_file, tmp_path / "run"), capsys)
    assert code == 2 and "no such file or directory" in one_error(err)


def test_unsupported_architecture(data_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    from tokenizers_for_tests import make_tokenizer

    tok = make_tokenizer()
    model = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16,
                                         num_hidden_layers=2, state_size=4))
    model.save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    code, err = run(train(tmp_path / "mamba", data_file, tmp_path / "run"), capsys)
    assert code == 2
    line = one_error(err)
    assert "MambaForCausalLM" in line and "no decoder layers found" in line


def test_adapter_made_for_another_model(model_dir: Path, data_file: Path,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenizers_for_tests import make_tokenizer

    assert main(train(model_dir, data_file, tmp_path / "run")) == 0
    capsys.readouterr()
    tok = make_tokenizer()
    other = tmp_path / "wider"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    code, err = run(["eval", "--model", str(other), "--adapter",
                     str(tmp_path / "run" / "adapter"), "--data", str(data_file)], capsys)
    assert code == 2 and "hidden size 32" in one_error(err)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--neurons", "64", "--top-k", "40", "--experts", "8", "--n-probe", "2"],
         "--top-k 40 must be"),
        (["--neurons", "64", "--experts", "7"], "must divide"),
        (["--weight-decay", "-1"], "--weight-decay must be"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be"),
    ],
)
def test_invalid_config_values(flags: list[str], needle: str, model_dir: Path,
                               data_file: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run([*train(model_dir, data_file, tmp_path / "run"), *flags], capsys)
    assert code == 2 and needle in one_error(err)


def test_non_positive_lr_is_one_line_naming_the_field(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    code, err = run(["train", "--lr", "0"], capsys)
    assert code == 2 and one_error(err) == "meft: error: --lr must be a positive number, got 0.0"


def test_non_numeric_flag_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "fast"])
    assert info.value.code == 2 and "invalid float value: 'fast'" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import meft.engine.optim as optim_module

    real = optim_module.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        norm = real(*args, **kwargs)  # type: ignore[arg-type]
        return torch.tensor(float("nan")) if calls["n"] == 3 else norm

    monkeypatch.setattr(optim_module, "clip_grad_norm_", poisoned)
    out = tmp_path / "run"
    code, err = run([*train(model_dir, data_file, out, "--save-every", "1"), "--steps", "5"],
                    capsys)
    assert code == 2
    assert "step 3" in one_error(err)
    assert "last good checkpoint" in err and "step-00000002" in err
    assert (out / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()
    assert not (out / "checkpoints" / "step-00000003").exists()


def test_tables_that_cannot_fit_are_refused_before_allocating(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--neurons", str(2**28), "--experts", str(2**14), "--top-k", "4", "--n-probe", "2"]
    code, err = run([*train(model_dir, data_file, tmp_path / "run"), *flags], capsys)
    line = one_error(err)
    assert code == 2 and "GB of host memory" in line and "available" in line


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), e=st.integers(1, 400), k=st.integers(-2, 600),
       p=st.integers(-2, 50))
def test_config_validation_property(n: int, e: int, k: int, p: int) -> None:
    """A config is accepted exactly when the routing sizes are consistent."""
    valid = n % e == 0 and 1 <= p <= e and 1 <= k <= p * (n // e)
    try:
        cfg = MeftConfig(neurons=n, experts=e, top_k=k, n_probe=p)
    except ConfigError as err:
        assert not valid, err
        assert "\n" not in str(err)
    else:
        assert valid
        assert MeftConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ issue 35: the first hour
def test_yaml_and_flags_take_the_same_spellings(model_dir: Path, data_file: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """YAML 1.1 reads ``retain: off`` as false and ``no-retention: true`` names the flag;
    the command line takes underscores as YAML does (``--top_k``)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("retain: off\nno-retention: true\nno_plots: true\n")
    out = tmp_path / "run"
    code, err = run([*train(model_dir, data_file, out, "--config", str(cfg)), "--top_k", "4"],
                    capsys)
    assert code == 0, err
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["train"]["retain"] == "off" and recorded["run"]["retention"] is False
    assert recorded["adapter"]["top_k"] == 4 and recorded["run"]["plots"] is False
    cfg.write_text("no-retention: maybe\n")
    code, err = run([*train(model_dir, data_file, tmp_path / "r2"), "--config", str(cfg)],
                    capsys)
    assert code == 2 and "no-retention must be true or false, got 'maybe'" in one_error(err)


def test_a_closed_pipe_is_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``meft info --json | head``: the reader goes away; meft stops quietly with SIGPIPE's
    status instead of a BrokenPipeError traceback."""
    import io
    import sys

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    old = Path(__file__).parent / "data" / "adapter-0.1.0"
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["info", "--adapter", str(old), "--json"]) == 141
    assert capsys.readouterr().err == ""


def test_eval_and_generate_load_the_model_the_adapter_was_trained_on(
        model_dir: Path, data_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --model, eval and generate load the adapter's recorded base model (they loaded
    the embedded default and failed on its hidden size); a run records its model by absolute
    path, so this works from any directory; a base model that is gone is one line."""
    import shutil

    local = tmp_path / "models" / "tiny"
    shutil.copytree(model_dir, local)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = train(Path("models/tiny"), data_file, out, "--no-retention", "--retain", "off")
    code, err = run(args, capsys)
    assert code == 0, err
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model"] == str(local.resolve())
    monkeypatch.chdir(out)
    code, err = run(["generate", "--adapter", "adapter", "--prompt", "hi",
                     "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    code, err = run(["eval", "--adapter", "adapter", "--data", str(data_file),
                     "--max-eval", "2", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    shutil.rmtree(local)
    code, err = run(["generate", "--adapter", "adapter", "--prompt", "hi"], capsys)
    assert code == 2
    assert f"adapter adapter was trained on {local.resolve()}, which is not there: pass " \
           "--model" in one_error(err)


def test_a_run_records_absolute_paths_and_resumes_from_anywhere(
        model_dir: Path, data_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Paths typed relative to one directory are recorded absolute: --resume works from
    another directory, and naming the same file by its absolute path is no change."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(data_file, work / "qa.jsonl")
    monkeypatch.chdir(work)
    code, err = run(["train", "--model", str(model_dir), "--data", "qa.jsonl", "--output",
                     "run", "--steps", "4", "--stop-after", "2", "--batch-size", "2",
                     "--no-retention", "--retain", "off", *FAST, *TINY], capsys)
    assert code == 0, err
    recorded = json.loads((work / "run" / "run_config.json").read_text())
    assert recorded["run"]["data"] == str(work / "qa.jsonl")
    assert recorded["run"]["output"] == str(work / "run")
    monkeypatch.chdir(tmp_path)
    code, err = run(["train", "--resume", "work/run", "--data", str(work / "qa.jsonl"),
                     "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((work / "run" / "run.json").read_text())["steps"] == 4


def test_resume_refuses_steps_it_cannot_honour(model_dir: Path, data_file: Path,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--steps below the run's step re-evaluated and rewrote the adapter with exit 0: one line
    now. More steps for a finished run silently reshaped a schedule already spent, and
    lengthening an unfinished run reshaped its schedule: both say so now."""
    out = tmp_path / "run"
    base = ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(out),
            "--batch-size", "2", "--no-retention", "--retain", "off", *FAST, *TINY]
    code, err = run([*base, "--steps", "6", "--stop-after", "4"], capsys)
    assert code == 0, err
    code, err = run(["train", "--resume", str(out), "--steps", "3"], capsys)
    assert code == 2 and "the run is already at step 4" in one_error(err)
    code, err = run(["train", "--resume", str(out), "--steps", "7", "--no-progress"], capsys)
    assert code == 0 and "schedule of this run now ends at step 7 instead of 6" in err
    code, err = run(["train", "--resume", str(out), "--steps", "9", "--no-progress"], capsys)
    assert code == 0 and "the run finished its 7 steps with its learning rate decayed" in err
    assert "rises again to 22% of its peak" in err and f"--adapter {out / 'adapter'}" in err


def test_eval_data_without_answers_is_refused_before_training(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Text-only --eval-data printed an empty table and wrote {} with exit 0 (meft eval
    refuses the same file)."""
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "Varnel Okasu was born in Teluvia."}\n')
    code, err = run(train(model_dir, data_file, tmp_path / "run", "--eval-data", str(text)),
                    capsys)
    assert code == 2
    assert f"--eval-data {text}: no examples with reference answers" in one_error(err)
    assert not (tmp_path / "run" / "checkpoints").exists()  # before any training
    code, err = run(["eval", "--model", str(model_dir), "--data", str(text)], capsys)
    assert code == 2 and "no examples with reference answers" in one_error(err)


def test_an_unknown_model_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A hub id in no local cache, with the hub unreachable, is one line before any
    download attempt (transformers retried it for 30-50 s); ``dir/name`` with ``dir`` a local
    directory is a mistyped path, not a hub id."""
    import meft.adapter.loading as loading

    tried: list[dict] = []
    real = loading.from_hub_or_local

    def spy(source, load, **kw):  # type: ignore[no-untyped-def]
        def recording(path, **kwargs):  # type: ignore[no-untyped-def]
            tried.append(kwargs)
            return load(path, **kwargs)
        return real(source, recording, **kw)

    monkeypatch.setattr(loading, "from_hub_or_local", spy)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    code, err = run(["eval", "--model", "nobody/no-such-model"], capsys)
    assert code == 2 and "not in the Hugging Face cache, and the hub does not answer" in err
    assert tried and all(kw.get("local_files_only") for kw in tried)  # no hub attempt
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = run(["eval", "--model", "models/tny"], capsys)
    assert code == 2 and "model 'models/tny': no such file or directory" in one_error(err)


def test_saved_directories_are_as_readable_as_mkdir_makes_them(tmp_path: Path) -> None:
    """An adapter or checkpoint directory came out 0700 (mkdtemp's) while the rest of a run
    was 0755 under the usual umask: another user could not read it."""
    import os
    import stat

    from meft.adapter.serialization import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "adapter").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_config.json").stat().st_mode) == 0o644


def test_help_puts_common_flags_first_and_no_progress_means_none(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``train --help``: a short usage, the common flags in their own group, the rest under
    "advanced"; a negative flag says what it turns off. ``--no-progress`` silences the
    libraries' bars too (transformers drew its weight-loading bar)."""
    from meft.cli.commands import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert text.startswith("usage: meft train [options]")
    common = text.index("common options:")
    advanced = text.index("advanced: training:")
    assert common < text.index("--neurons NEURONS") < advanced < text.index("--warmup-ratio")
    assert "--no-plots            turn off: write PNG plots (on by default)" in text
    code, err = run(train(model_dir, data_file, tmp_path / "run", "--no-retention",
                          "--retain", "off"), capsys)
    assert code == 0 and "it/s]" not in err and "%|" not in err
