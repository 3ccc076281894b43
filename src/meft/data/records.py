"""Datasets: JSONL records -> :class:`Sample` -> token ids with loss labels -> padded batches.

Record formats (one JSON object per line of a ``.jsonl`` file; blank lines are skipped). The
format is detected per record by its keys, in this order; other keys are ignored:

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: a chat.
  It needs at least one assistant turn and must not open with one. The loss covers every
  assistant turn; turns after the last assistant turn are kept in the sample but not encoded.
* ``{"question": str, "answer": str | [str, ...]}``: the answer may be a list of aliases (all
  kept as references for evaluation); the training target is the first alias.
* ``{"prompt": str, "completion": str}``: the loss covers the completion.
* ``{"text": str}``: plain text, the loss covers every token (no chat template).

A directory written by ``datasets``' ``save_to_disk`` holds rows in the same formats.

Every problem raises :class:`DataError`, a ``ValueError`` whose message is one line starting
with where the problem is: ``data.jsonl:7: invalid JSON (...)``. The file is read as bytes and
decoded line by line so that a bad byte is reported with its line.

Encoding. With a chat template, qa and prompt/completion records become a two-turn chat
[user, assistant] and every record is rendered by the tokenizer's own template, so the model
is fine-tuned in the format it will be prompted with. For assistant turn i, the context
``apply_chat_template(msgs[:i], add_generation_prompt=True)`` must be a prefix of
``apply_chat_template(msgs[:i + 1])``; the difference (the content plus whatever the template
appends after it, e.g. ``<|im_end|>\\n``) is labelled, which teaches the model to stop. The
pieces are tokenized separately with ``add_special_tokens=False`` (the template carries any
BOS) and concatenated, so the label boundary is exact. Without a chat template a plain format
is used: ``"Question: {q}\\nAnswer:"`` then ``" {answer}"`` + EOS for qa, prompt then
completion + EOS, ``"User: ...\\nAssistant:"`` lines for chats, and text + EOS with every token
labelled. There the first piece is tokenized with the tokenizer's special tokens (a BOS for
tokenizers that add one).

Sequences longer than ``max_length`` keep their beginning; ``Encoded.truncated`` tells the
caller, which decides whether to warn or drop (a sample whose labelled tokens were all cut has
no label left).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from meft.console import say
from meft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
KINDS = ("qa", "prompt", "messages", "text")
ROLES = ("system", "user", "assistant")
_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example.

    ``messages`` holds the chat turns including the final assistant turn(s) (for qa:
    [user: question, assistant: first alias]; for prompt: [user: prompt, assistant:
    completion]); it is empty for text. ``answers`` are the evaluation references: the aliases
    for qa, ``(completion,)`` for prompt, the last assistant content for messages, ``()`` for
    text. ``source`` ("file:line") locates the record in messages and takes no part in
    equality.
    """

    kind: str
    messages: tuple[dict[str, str], ...]
    text: str
    answers: tuple[str, ...]
    source: str = field(compare=False)


@dataclass
class Encoded:
    """Token ids and labels (``IGNORE_INDEX`` where there is no loss), of equal length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def target_tokens(self) -> int:
        """Positions that carry loss after the one-token shift of next-token prediction."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)

    def first_targets(self, n: int) -> Encoded:
        """This sequence cut just after its first ``n`` target tokens (itself if it has no
        more): the positions before a cut see what they saw, so their predictions are
        unchanged."""
        seen = 0
        for j, y in enumerate(self.labels[1:], start=1):
            if y != IGNORE_INDEX:
                seen += 1
                if seen == n:
                    return Encoded(self.input_ids[:j + 1], self.labels[:j + 1],
                                   self.truncated or j + 1 < len(self.input_ids))
        return self


# ---------------------------------------------------------------------------------------------
# parsing


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _string_field(obj: dict[str, Any], key: str, source: str) -> str:
    if key not in obj:
        present = next(k for k in ("question", "answer", "prompt", "completion") if k in obj)
        raise DataError(f'{source}: field "{key}" is missing (the record has "{present}")')
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f'{source}: field "{key}" must be a string, got {_type_name(value)}')
    return value


def _aliases(value: object, source: str) -> tuple[str, ...]:
    expected = 'field "answer" must be a string or a non-empty list of strings'
    if isinstance(value, str):
        aliases: tuple[str, ...] = (value,)
    elif isinstance(value, list):
        if not value:
            raise DataError(f"{source}: {expected}, got an empty list")
        for v in value:
            if not isinstance(v, str):
                raise DataError(f"{source}: {expected}, got a list containing {_type_name(v)}")
        aliases = tuple(value)
    else:
        raise DataError(f"{source}: {expected}, got {_type_name(value)}")
    if any(not a.strip() for a in aliases):
        raise DataError(f'{source}: field "answer" contains an empty answer')
    return aliases


def _messages(value: object, source: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise DataError(f'{source}: field "messages" must be a non-empty list, got {got}')
    turns = []
    for i, m in enumerate(value):
        where = f"{source}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object, got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f'{where}: "role" must be one of {", ".join(ROLES)}, got {role!r}')
        if not isinstance(content, str):
            raise DataError(f'{where}: "content" must be a string, got {_type_name(content)}')
        turns.append({"role": role, "content": content})
    if turns[0]["role"] == "assistant":
        raise DataError(f"{source}: messages[0] is an assistant turn; a chat must open with a "
                        "system or user turn")
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{source}: messages has no assistant turn to train on")
    return tuple(turns)


def parse_record(obj: object, source: str) -> Sample:
    """Validate one decoded JSON record (see the module docstring for the formats)."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        turns = _messages(obj["messages"], source)
        last = [t["content"] for t in turns if t["role"] == "assistant"][-1]
        return Sample("messages", turns, "", (last,), source)
    if "question" in obj or "answer" in obj:
        question = _string_field(obj, "question", source)
        if "answer" not in obj:
            raise DataError(f'{source}: field "answer" is missing (the record has "question")')
        aliases = _aliases(obj["answer"], source)
        turns = ({"role": "user", "content": question},
                 {"role": "assistant", "content": aliases[0]})
        return Sample("qa", turns, "", aliases, source)
    if "prompt" in obj or "completion" in obj:
        prompt = _string_field(obj, "prompt", source)
        completion = _string_field(obj, "completion", source)
        turns = ({"role": "user", "content": prompt},
                 {"role": "assistant", "content": completion})
        return Sample("prompt", turns, "", (completion,), source)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f'{source}: field "text" must be a string, got {_type_name(text)}')
        return Sample("text", (), text, (), source)
    keys = ", ".join(str(k) for k in obj) or "none"
    raise DataError(f"{source}: no known fields: expected question/answer, prompt/completion, "
                    f"messages or text (got keys: {keys})")


def to_record(sample: Sample) -> dict[str, Any]:
    """The JSON record that :func:`parse_record` reads back as an equal sample."""
    if sample.kind == "qa":
        return {"question": sample.messages[0]["content"], "answer": list(sample.answers)}
    if sample.kind == "prompt":
        return {"prompt": sample.messages[0]["content"],
                "completion": sample.messages[1]["content"]}
    if sample.kind == "messages":
        return {"messages": [dict(m) for m in sample.messages]}
    if sample.kind == "text":
        return {"text": sample.text}
    raise ValueError(f"unknown sample kind {sample.kind!r}; expected one of {KINDS}")


def write_jsonl(samples: Sequence[Sample], path: str | Path) -> None:
    """Write one record per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(json.dumps(to_record(s), ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[Sample]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    samples = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        source = f"{path}:{number}"
        if number == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
            line_bytes = line_bytes[3:]  # a UTF-8 byte-order mark some editors write
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not valid UTF-8 (byte 0x{line_bytes[e.start]:02x} at "
                            f"position {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: invalid JSON ({e.msg} at column {e.colno})") from None
        samples.append(parse_record(obj, source))
    return samples


def _read_saved_dataset(path: Path) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset directory needs the 'datasets' "
                        "package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a directory it cannot read
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: cannot load as a saved dataset ({msg})") from None
    if isinstance(ds, dict):  # a DatasetDict: one directory per split
        if len(ds) != 1:
            raise DataError(f"{path}: holds the splits {', '.join(ds)}; pass one split's "
                            f"directory, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return [parse_record(row, f"{path}:row {i}") for i, row in enumerate(ds)]


def load_samples(path: str | Path) -> list[Sample]:
    """Read a JSONL file, or a directory saved with ``datasets``' ``save_to_disk``.

    Sources are "file:line" (1-based) or "dir:row N" (0-based, as ``dataset[N]``).
    """
    path = Path(path)
    if path.is_dir():
        samples = _read_saved_dataset(path)
    elif path.exists():
        samples = _read_jsonl(path)
    else:
        raise DataError(f"{path}: no such file")
    if not samples:
        raise DataError(f"{path}: no examples")
    return samples


# ---------------------------------------------------------------------------------------------
# rendering and tokenisation


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether samples are rendered with the tokenizer's chat template (all kinds but text)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _encoded_turns(sample: Sample) -> list[dict[str, str]]:
    """The turns up to and including the last assistant turn."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    return list(sample.messages[: last + 1])


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], *,
            generation_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(turns, tokenize=False,
                                        add_generation_prompt=generation_prompt)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}")
    return out


def _template_pieces(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The chat-template rendering cut into (text, labelled) pieces."""
    turns = _encoded_turns(sample)
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendering of the turns consumed so far
    for i, m in enumerate(turns):
        if m["role"] != "assistant":
            continue
        context = _render(tokenizer, turns[:i], generation_prompt=True)
        full = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not context.startswith(done) or not full.startswith(context):
            raise DataError(
                f"{sample.source}: the tokenizer's chat template does not render turn {i} as "
                "an extension of the turns before it, so its loss labels cannot be placed"
            )
        pieces += [(context[len(done):], False), (full[len(context):], True)]
        done = full
    return pieces


def _plain_pieces(sample: Sample) -> list[tuple[str, bool]]:
    """The plain rendering (no chat template) as (text, labelled) pieces; EOS follows each
    labelled piece."""
    if sample.kind == "qa":
        return [(f"Question: {sample.messages[0]['content']}\nAnswer:", False),
                (f" {sample.messages[1]['content']}", True)]
    if sample.kind == "prompt":
        return [(sample.messages[0]["content"], False), (sample.messages[1]["content"], True)]
    if sample.kind == "messages":
        pieces: list[tuple[str, bool]] = []
        for m in _encoded_turns(sample):
            sep = "\n" if pieces else ""
            name = _PLAIN_ROLE[m["role"]]
            if m["role"] == "assistant":
                pieces += [(f"{sep}{name}:", False), (f" {m['content']}", True)]
            else:
                pieces.append((f"{sep}{name}: {m['content']}", False))
        return pieces
    if sample.kind == "text":
        return [(sample.text, True)]
    raise ValueError(f"unknown sample kind {sample.kind!r}; expected one of {KINDS}")


def prompt_text(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text to generate from: everything before the last assistant turn's content.

    With a chat template, the template's rendering of the turns before the last assistant turn
    with the generation prompt; otherwise the plain format ("Question: ...\\nAnswer:", the
    prompt, or "User: ...\\nAssistant:" lines with EOS after earlier assistant turns, as in
    training).
    """
    if sample.kind == "text":
        raise DataError(f"{sample.source}: a text sample has no prompt to generate from")
    if has_chat_template(tokenizer):
        turns = _encoded_turns(sample)
        return _render(tokenizer, turns[:-1], generation_prompt=True)
    pieces = _plain_pieces(sample)[:-1]  # drop the last target
    eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else ""
    return "".join(text + (eos if labelled else "") for text, labelled in pieces)


def prompt_ids(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """:func:`prompt_text` tokenized as in training: with a chat template the rendering carries
    any BOS itself (no special tokens added); the plain format gets the tokenizer's own."""
    ids: list[int] = tokenizer.encode(prompt_text(sample, tokenizer),
                                      add_special_tokens=not has_chat_template(tokenizer))
    return ids


def encode(sample: Sample, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Token ids and labels for one sample (see the module docstring), cut to ``max_length``."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids: list[int] = []
    labels: list[int] = []
    if sample.kind != "text" and has_chat_template(tokenizer):
        for text, labelled in _template_pieces(sample, tokenizer):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    else:
        eos = tokenizer.eos_token_id
        for i, (text, labelled) in enumerate(_plain_pieces(sample)):
            piece = tokenizer.encode(text, add_special_tokens=i == 0)
            if labelled and isinstance(eos, int):
                piece = [*piece, eos]
            ids += piece
            labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


# ---------------------------------------------------------------------------------------------
# batching


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids (pad_id), attention_mask (0) and labels
    (``IGNORE_INDEX``) on pads; all int64 (B, L)."""
    if not batch:
        raise ValueError("collate needs at least one sequence")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.int64)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.int64)
    for row, e in enumerate(batch):
        if len(e.labels) != len(e.input_ids):
            raise ValueError(f"sequence {row} has {len(e.input_ids)} ids but "
                             f"{len(e.labels)} labels")
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.int64)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(encoded: Sequence[Encoded], batch_size: int, *, seed: int,
                    epoch: int) -> Iterator[list[int]]:
    """Index lists covering ``range(len(encoded))`` once, in an order fixed by (seed, epoch);
    the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    order = torch.randperm(len(encoded), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def encode_all(samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, max_length: int,
               what: str) -> list[Encoded]:
    """Encode every sample; warn once about truncated ones and drop those left with no
    answer token to learn (``what`` names the set in the warnings)."""
    encoded, truncated, dropped = [], 0, 0
    for sample in samples:
        enc = encode(sample, tokenizer, max_length)
        truncated += enc.truncated
        if all(y == IGNORE_INDEX for y in enc.labels):
            dropped += 1
            continue
        encoded.append(enc)
    if truncated:
        say(f"warning: {truncated} {what} example(s) longer than --max-length {max_length} "
            "were truncated")
    if dropped:
        say(f"warning: {dropped} {what} example(s) lost every answer token to truncation and "
            "were dropped")
    return encoded
