"""Retention: how much of what the base model knew a fine-tuned model still knows.

Learning new facts is half of the story; the other half is what training breaks. Before
training, :meth:`RetentionProbe.build` asks the base model two sets of general questions
(greedy decoding, as the evaluation does), keeps the ones it answers correctly in each, and
measures its mean token loss on the general text shipped with meft. After training,
:meth:`RetentionProbe.measure` asks the kept questions again:

    retention             = kept questions still answered / kept questions, on the headline
                            set: :func:`meft.data.general.unseen_questions`, kinds whose templates
                            and domains forgetting protection's replay pool never contains
                            (or the user's own, ``--probe FILE``)
    retention_seen_kinds  = the same on :func:`meft.data.general.general_questions`, whose kinds
                            (capitals, chemical symbols, sums ...) the replay pool trains on
                            with other entities: replay protects them directly, so they
                            flatter it, and are reported apart
    retention_adjacent    = the same on questions like the training data's own about what
                            the base model knows (:mod:`meft.data.adjacent`: real people for
                            the synthetic set, known airports for airports): where new
                            knowledge looks like old, forgetting concentrates; None when
                            there are none (the user's own data)
    general_loss_delta    = mean token loss on the general text, after - before

A question counts as answered when an alias appears in the output as whole words after SQuAD
normalisation (the ``contains`` metric, the paper's EM): small chat models answer in sentences
("The capital of France is Paris."), which exact match would count as wrong before and after
alike. The probe (the headline questions themselves, the kept indices, the base loss) is plain
JSON, so a resumed run or a benchmark worker reuses the one built from the untouched base
model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meft.data.general import general_questions, general_text_samples, unseen_questions
from meft.data.records import Encoded, Sample, encode, load_samples, parse_record, to_record
from meft.errors import DataError, SerializationError
from meft.evaluation import evaluate
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import answer_loss

PROBE_FILE = "retention_probe.json"


def general_loss(model: Any, tokenizer: Any, *, window: int = 256,
                 cache: BaseCache | None = None) -> float:
    """Mean next-token loss of ``model`` on the general text (every token is labelled), each
    paragraph cut into windows of at most ``window`` tokens; with ``cache`` (``model`` is its
    base model) looked up first and kept."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = general_windows(tokenizer, window)
    if cache is None:
        return answer_loss(model, encoded, pad)
    inputs = {"windows": [[e.input_ids, e.labels] for e in encoded], "pad": pad}
    return float(cache.get("general_loss", inputs, lambda: answer_loss(model, encoded, pad)))


def general_windows(tokenizer: Any, window: int = 256) -> list[Encoded]:
    """The general text, each paragraph cut into windows of at most ``window`` tokens (longer
    than one), every token labelled: what :func:`general_loss` and
    :func:`meft.evaluation.exactness.reach` read."""
    encoded = []
    for sample in general_text_samples():
        whole = encode(sample, tokenizer, 1 << 20)
        for lo in range(0, len(whole.input_ids), window):
            ids = whole.input_ids[lo:lo + window]
            if len(ids) > 1:
                encoded.append(Encoded(ids, whole.labels[lo:lo + window], False))
    return encoded


def probe_questions(path: str | Path) -> list[Sample]:
    """A user's own retention questions (``--probe FILE``): question/answer records as
    ``--data`` reads them (an answer may be a list of aliases, any of which counts)."""
    if not Path(path).exists() and str(path).strip().isdigit():
        raise DataError(f"--probe {path}: no such file; --probe takes a JSONL of your own "
                        "retention questions (the experts probed per token are --n-probe)")
    samples = load_samples(path)
    bad = [s for s in samples if s.kind != "qa"]
    if bad:
        raise DataError(f"{bad[0].source}: a retention question needs a question and an "
                        f"answer ({{\"question\": ..., \"answer\": ...}}), got a {bad[0].kind} "
                        "record")
    return samples


def headline_of(probe: str | Path | None) -> dict[str, Any]:
    """:meth:`RetentionProbe.build`'s ``questions`` and ``source`` for ``--probe``: the
    file's questions, or nothing (the shipped unseen kinds)."""
    if probe is None:
        return {}
    return {"questions": probe_questions(probe), "source": str(probe)}


@dataclass
class RetentionProbe:
    """The general questions a base model answers correctly, and its general-text loss."""

    kept: list[int]  # indices into general_questions(): the seen kinds
    asked: int  # seen-kind questions asked of the base model
    base_general_loss: float
    questions: list[dict[str, Any]] = field(default_factory=list)  # the headline set (records)
    kept_headline: list[int] = field(default_factory=list)  # indices into questions
    source: str = "shipped"  # where the headline questions come from: shipped or a file
    adjacent: list[dict[str, Any]] = field(default_factory=list)  # adjacent kinds (records)
    kept_adjacent: list[int] = field(default_factory=list)  # indices into adjacent

    @classmethod
    def build(cls, model: Any, tokenizer: Any, *, max_new_tokens: int = 16,
              batch_size: int = 32, progress: bool = True,
              questions: Sequence[Sample] | None = None, source: str = "shipped",
              cache: BaseCache | None = None,
              adjacent: Sequence[Sample] = ()) -> RetentionProbe:
        """Ask ``model`` (the base model: call it before training) every question of the
        sets; ``questions``: the headline set (default: the shipped unseen kinds);
        ``adjacent``: questions of the training data's own kinds (:mod:`meft.data.adjacent`);
        ``cache``: the base model's results kept from an earlier run
        (:mod:`meft.evaluation.cache`)."""
        headline = list(questions) if questions is not None else unseen_questions()
        seen = general_questions()
        ok = evaluate.answered(model, tokenizer, [*headline, *seen],
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, desc="retention probe", cache=cache)
        near = (evaluate.answered(model, tokenizer, list(adjacent),
                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  progress=progress, desc="retention probe, adjacent",
                                  cache=cache) if adjacent else [])
        mine, theirs = ok[:len(headline)], ok[len(headline):]
        return cls([i for i, good in enumerate(theirs) if good], len(seen),
                   general_loss(model, tokenizer, cache=cache), [to_record(q) for q in headline],
                   [i for i, good in enumerate(mine) if good], source,
                   [to_record(q) for q in adjacent], [i for i, good in enumerate(near) if good])

    def headline(self) -> list[Sample]:
        return [parse_record(r, f"{self.source}:{i + 1}") for i, r in enumerate(self.questions)]

    def kept_questions(self) -> tuple[list[Sample], list[Sample]]:
        """The questions :meth:`measure` asks whose answers count towards ``retention`` and
        ``retention_adjacent`` (the ones the base model answered)."""
        headline = self.headline()
        return ([headline[i] for i in self.kept_headline],
                [parse_record(self.adjacent[i], f"adjacent:{i + 1}")
                 for i in self.kept_adjacent])

    def measure(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 16,
                batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
        """Retention on both sets and the general-loss change of ``model`` (the trained
        one)."""
        headline, seen = self.headline(), general_questions()
        near = [parse_record(self.adjacent[i], f"adjacent:{i + 1}") for i in self.kept_adjacent]
        asked = [headline[i] for i in self.kept_headline] + [seen[i] for i in self.kept]
        ok = evaluate.answered(model, tokenizer, asked + near, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress, desc="retention")
        ok, close = ok[:len(asked)], ok[len(asked):]
        mine, theirs = ok[:len(self.kept_headline)], ok[len(self.kept_headline):]
        loss = general_loss(model, tokenizer)
        return {
            "retention": sum(mine) / len(mine) if mine else None,
            "retained": sum(mine),
            "kept": len(mine),
            "asked": len(self.questions),
            "probe": self.source,
            "retention_seen_kinds": sum(theirs) / len(theirs) if theirs else None,
            "retained_seen_kinds": sum(theirs),
            "kept_seen_kinds": len(theirs),
            "asked_seen_kinds": self.asked,
            "general_loss_before": self.base_general_loss,
            "general_loss": loss,
            "general_loss_delta": loss - self.base_general_loss,
            "forgotten": [q.messages[0]["content"] for q, good in zip(
                asked[:len(mine)], mine, strict=True) if not good],
            "forgotten_seen_kinds": [q.messages[0]["content"] for q, good in zip(
                asked[len(mine):], theirs, strict=True) if not good],
            "retention_adjacent": sum(close) / len(close) if close else None,
            "retained_adjacent": sum(close),
            "kept_adjacent": len(close),
            "asked_adjacent": len(self.adjacent),
            "forgotten_adjacent": [q.messages[0]["content"] for q, good in zip(
                near, close, strict=True) if not good],
        }

    def summary(self) -> str:
        what = ("general questions of kinds replay never trains" if self.source == "shipped"
                else f"questions of {self.source}")
        near = (f", {len(self.kept_adjacent)} of {len(self.adjacent)} of the training data's "
                "own kinds" if self.adjacent else "")
        return (f"the base model answers {len(self.kept_headline)} of {len(self.questions)} "
                f"{what} and {len(self.kept)} of {self.asked} of the kinds replay "
                f"trains{near}; general text loss {self.base_general_loss:.3f}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RetentionProbe:
        data = json.loads(Path(path).read_text())
        if "questions" not in data:
            raise SerializationError(f"{path}: a retention probe of an older meft (seen kinds "
                                     "only); rerun without --resume, or with --no-retention")
        return cls(list(data["kept"]), int(data["asked"]), float(data["base_general_loss"]),
                   list(data["questions"]), list(data["kept_headline"]), str(data["source"]),
                   list(data.get("adjacent", [])), list(data.get("kept_adjacent", [])))


def describe(result: dict[str, Any]) -> str:
    """Two lines for the terminal: the headline, then the seen kinds and the text loss."""
    def share(rate: float | None, kept: int, retained: int) -> str:
        if rate is None:
            return "n/a: the base model answered none"
        return f"{100 * rate:.1f}% ({retained} of the {kept} the base model answered)"

    what = ("general questions of kinds replay never trains" if result["probe"] == "shipped"
            else f"the questions of {result['probe']}")
    seen = share(result["retention_seen_kinds"], result["kept_seen_kinds"],
                 result["retained_seen_kinds"])
    near = ("" if not result.get("asked_adjacent") else
            "\non questions of the training data's own kinds the base model knew: "
            + share(result["retention_adjacent"], result["kept_adjacent"],
                    result["retained_adjacent"]))
    return (f"retention on {what}: "
            f"{share(result['retention'], result['kept'], result['retained'])}\n"
            f"on the kinds replay trains: {seen}; general text loss "
            f"{result['general_loss_before']:.3f} -> {result['general_loss']:.3f} "
            f"({result['general_loss_delta']:+.3f})" + near)
