"""Retention: how much of what the base model knew a fine-tuned model still knows.

Learning new facts is half of the story; the other half is what training breaks. Before
training, :meth:`RetentionProbe.build` asks the base model the 215 general-knowledge questions
of :mod:`meft.general` (greedy decoding, as the evaluation does) and keeps the ones it answers
correctly, and measures its mean token loss on the general text shipped with meft. After
training, :meth:`RetentionProbe.measure` asks the kept questions again:

    retention          = kept questions still answered correctly / kept questions
    general_loss_delta = mean token loss on the general text, after - before

A question counts as answered when an alias appears in the output as whole words after SQuAD
normalisation (the ``contains`` metric, the paper's EM): small chat models answer in sentences
("The capital of France is Paris."), which exact match would count as wrong before and after
alike. The probe (kept question indices, the base loss) is plain JSON, so a resumed run or a
benchmark worker reuses the one built from the untouched base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meft import evaluate
from meft.data import Encoded, encode
from meft.evaluate import answer_loss
from meft.general import general_questions, general_text_samples

PROBE_FILE = "retention_probe.json"


def _correct(model: Any, tokenizer: Any, indices: list[int], *, max_new_tokens: int,
             batch_size: int, progress: bool, desc: str) -> list[bool]:
    questions = general_questions()
    return evaluate.answered(model, tokenizer, [questions[i] for i in indices],
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, desc=desc)


def general_loss(model: Any, tokenizer: Any, *, window: int = 256) -> float:
    """Mean next-token loss of ``model`` on the general text (every token is labelled), each
    paragraph cut into windows of at most ``window`` tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for sample in general_text_samples():
        whole = encode(sample, tokenizer, 1 << 20)
        for lo in range(0, len(whole.input_ids), window):
            ids = whole.input_ids[lo:lo + window]
            if len(ids) > 1:
                encoded.append(Encoded(ids, whole.labels[lo:lo + window], False))
    return answer_loss(model, encoded, pad)


@dataclass
class RetentionProbe:
    """The general questions a base model answers correctly, and its general-text loss."""

    kept: list[int]  # indices into general_questions()
    asked: int  # questions asked of the base model
    base_general_loss: float

    @classmethod
    def build(cls, model: Any, tokenizer: Any, *, max_new_tokens: int = 16,
              batch_size: int = 32, progress: bool = True) -> RetentionProbe:
        """Ask ``model`` (the base model: call it before training) every question."""
        everything = list(range(len(general_questions())))
        ok = _correct(model, tokenizer, everything, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, progress=progress, desc="retention probe")
        return cls([i for i, good in zip(everything, ok, strict=True) if good],
                   len(everything), general_loss(model, tokenizer))

    def measure(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 16,
                batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
        """Retention and general-loss change of ``model`` (the trained one)."""
        ok = _correct(model, tokenizer, self.kept, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, progress=progress, desc="retention")
        loss = general_loss(model, tokenizer)
        questions = general_questions()
        return {
            "retention": sum(ok) / len(ok) if ok else None,
            "retained": sum(ok),
            "kept": len(self.kept),
            "asked": self.asked,
            "general_loss_before": self.base_general_loss,
            "general_loss": loss,
            "general_loss_delta": loss - self.base_general_loss,
            "forgotten": [questions[i].messages[0]["content"]
                          for i, good in zip(self.kept, ok, strict=True) if not good],
        }

    def summary(self) -> str:
        return (f"the base model answers {len(self.kept)} of {self.asked} general questions; "
                f"general text loss {self.base_general_loss:.3f}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RetentionProbe:
        data = json.loads(Path(path).read_text())
        return cls(list(data["kept"]), int(data["asked"]), float(data["base_general_loss"]))


def describe(result: dict[str, Any]) -> str:
    """One line for the terminal."""
    if result["retention"] is None:
        kept = "n/a: the base model answered none of the general questions"
    else:
        kept = (f"{100 * result['retention']:.1f}% ({result['retained']} of the "
                f"{result['kept']} general questions the base model answered)")
    return (f"retention {kept}; general text loss {result['general_loss_before']:.3f} -> "
            f"{result['general_loss']:.3f} ({result['general_loss_delta']:+.3f})")
