"""JSONL records, errors, chat-template encoding with exact label spans, batching."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from meft.data.records import (
    IGNORE_INDEX,
    DataError,
    Encoded,
    Sample,
    collate,
    encode,
    iterate_batches,
    load_samples,
    parse_record,
    prompt_ids,
    prompt_text,
    write_jsonl,
)
from tokenizers_for_tests import make_tokenizer

CHAT = make_tokenizer()
PLAIN = make_tokenizer(chat_template=False)
PLAIN_BOS = make_tokenizer(chat_template=False, bos=True)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled_runs(tok: Any, enc: Encoded) -> list[str]:
    """Decoded text of each maximal run of labelled positions."""
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(enc.input_ids, enc.labels, strict=True):
        on = lab != IGNORE_INDEX
        if on:
            assert lab == i  # a label is the token itself (the model shifts)
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = on
    return [tok.decode(r) for r in runs]


QA = {"question": "Where was Ada born?", "answer": ["London", "LDN"]}
CHAT_RECORD = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine"},
]}


# ---------------------------------------------------------------------------------------------
# parsing


def test_load_all_formats_with_blank_lines_and_sources(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps(QA),
        "",
        json.dumps({"question": "2+2?", "answer": "4", "id": 7}),
        "   ",
        json.dumps({"prompt": "Once upon", "completion": " a time"}),
        json.dumps(CHAT_RECORD),
        json.dumps({"text": "Plain text."}),
    ])
    qa, qa1, pc, chat, text = load_samples(path)
    assert qa.kind == "qa" and qa.answers == ("London", "LDN")
    assert qa.messages == ({"role": "user", "content": "Where was Ada born?"},
                           {"role": "assistant", "content": "London"})  # first alias trains
    assert qa.source == f"{path}:1"
    assert qa1.answers == ("4",) and qa1.source == f"{path}:3"
    assert pc.kind == "prompt" and pc.answers == (" a time",) and pc.source == f"{path}:5"
    assert pc.messages[0]["content"] == "Once upon"
    assert chat.kind == "messages" and chat.answers == ("Fine",)
    assert chat.messages == tuple(CHAT_RECORD["messages"])
    assert text == Sample("text", (), "Plain text.", (), "anywhere")  # source not compared
    assert text.source == f"{path}:7"


def test_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(QA).encode() + b"\r\n{\"text\": \"x\"}\r\n")
    assert [s.kind for s in load_samples(path)] == ["qa", "text"]


BAD_LINES = [
    ('{"question": "a" "answer": "b"}', "invalid JSON (Expecting ',' delimiter"),
    ('{"question": "a", "answer": 3}',
     'field "answer" must be a string or a non-empty list of strings, got int'),
    ('{"question": "a", "answer": []}', "got an empty list"),
    ('{"question": "a", "answer": ["x", null]}', "got a list containing null"),
    ('{"question": "a", "answer": ["x", " "]}', 'field "answer" contains an empty answer'),
    ('{"question": 5, "answer": "b"}', 'field "question" must be a string, got int'),
    ('{"question": "a"}', 'field "answer" is missing'),
    ('{"answer": "a"}', 'field "question" is missing'),
    ('{"prompt": "a"}', 'field "completion" is missing'),
    ('{"prompt": "a", "completion": ["b"]}', 'field "completion" must be a string, got list'),
    ('{"foo": 1, "bar": 2}', "no known fields: expected question/answer, prompt/completion, "
                             "messages or text (got keys: foo, bar)"),
    ("{}", "(got keys: none)"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got string"),
    ('{"text": null}', 'field "text" must be a string, got null'),
    ('{"messages": []}', 'field "messages" must be a non-empty list, got an empty list'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, "x"]}',
     "messages[1] must be an object, got string"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0]: \"role\" must be one of"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}',
     'messages[0]: "content" must be a string, got int'),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "must open with a system or user"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_bad_record_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(QA), "", line, json.dumps(QA)])
    with pytest.raises(DataError) as info:
        load_samples(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ")
    assert problem in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_not_utf8_names_line_byte_and_position(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(QA).encode()] * 4 + [b'{"t\xffext": "x"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"^.*data\.jsonl:5: not valid UTF-8 \(byte 0xff at "
                                        r"position 3\)$"):
        load_samples(path)


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_samples(missing)
    assert str(info.value) == f"{missing}: no such file"
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError) as info:
        load_samples(empty)
    assert str(info.value) == f"{empty}: no examples"


def test_saved_dataset_directory_without_datasets(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package: pip install datasets"):
        load_samples(tmp_path)


def test_saved_dataset_directory_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    splits: dict[str, object] = {}
    fake.load_from_disk = lambda p: splits[p]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = [QA, {"text": "hello"}]
    splits[str(tmp_path)] = rows  # iterating a Dataset yields one dict per row
    got = load_samples(tmp_path)
    assert [s.kind for s in got] == ["qa", "text"]
    assert got[1].source == f"{tmp_path}:row 1"
    splits[str(tmp_path)] = {"train": rows, "test": rows}  # a DatasetDict is a dict of splits
    with pytest.raises(DataError, match="holds the splits train, test"):
        load_samples(tmp_path)
    splits[str(tmp_path)] = {"train": [QA, {"nope": 1}]}
    with pytest.raises(DataError, match=r":row 1: no known fields"):
        load_samples(tmp_path)


def test_write_jsonl_round_trip_all_kinds(tmp_path: Path) -> None:
    samples = [parse_record(r, "mem") for r in (
        QA, {"prompt": "p", "completion": "c"}, CHAT_RECORD, {"text": "t\u00e9\n"})]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(samples, path)
    assert load_samples(path) == samples


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)
_known = {"question", "answer", "prompt", "completion", "messages", "text"}


@given(question=st.text(),
       aliases=st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=4),
       extra=st.dictionaries(st.text().filter(lambda k: k not in _known), _json, max_size=3))
def test_parse_record_keeps_aliases(question: str, aliases: list[str],
                                    extra: dict[str, Any]) -> None:
    s = parse_record({**extra, "question": question, "answer": aliases}, "f:1")
    assert s.kind == "qa"
    assert s.answers == tuple(aliases)
    assert s.messages[0]["content"] == question
    assert s.messages[1]["content"] == aliases[0]


@given(_json_scalars | st.lists(_json, max_size=3))
def test_parse_record_rejects_non_objects(value: object) -> None:
    with pytest.raises(DataError, match=r"^f:9: expected a JSON object, got "):
        parse_record(value, "f:9")


# ---------------------------------------------------------------------------------------------
# encoding with a chat template


def test_encode_qa_with_chat_template_labels_answer_and_end_of_turn() -> None:
    s = parse_record(QA, "f:1")
    enc = encode(s, CHAT, max_length=256)
    assert not enc.truncated
    assert CHAT.decode(enc.input_ids) == (
        "<|im_start|>user\nWhere was Ada born?<|im_end|>\n<|im_start|>assistant\nLondon<|im_end|>\n"
    )
    assert labelled_runs(CHAT, enc) == ["London<|im_end|>\n"]
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert CHAT.decode(enc.input_ids[:first]) == (
        "<|im_start|>user\nWhere was Ada born?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(enc.labels[:first]) == {IGNORE_INDEX}
    assert prompt_ids(s, CHAT) == enc.input_ids[:first]  # generation sees the training prefix


def test_encode_prompt_completion_with_chat_template() -> None:
    s = parse_record({"prompt": "Say hi", "completion": "hi"}, "f:1")
    enc = encode(s, CHAT, max_length=256)
    assert labelled_runs(CHAT, enc) == ["hi<|im_end|>\n"]
    assert prompt_text(s, CHAT) == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_messages_labels_every_assistant_turn() -> None:
    s = parse_record(CHAT_RECORD, "f:1")
    enc = encode(s, CHAT, max_length=256)
    assert labelled_runs(CHAT, enc) == ["Hello there<|im_end|>\n", "Fine<|im_end|>\n"]
    want_prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello there<|im_end|>\n"
                   "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_text(s, CHAT) == want_prompt
    assert CHAT.decode(enc.input_ids) == want_prompt + "Fine<|im_end|>\n"


def test_turns_after_the_last_assistant_are_not_encoded() -> None:
    record = {"messages": [*CHAT_RECORD["messages"], {"role": "user", "content": "Bye"}]}
    enc = encode(parse_record(record, "f:1"), CHAT, max_length=256)
    assert CHAT.decode(enc.input_ids).endswith("<|im_start|>assistant\nFine<|im_end|>\n")


def test_template_that_rewrites_earlier_turns_is_rejected() -> None:
    tok = make_tokenizer()
    # marks the final message: earlier renderings are then no prefix of later ones
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}"
                         "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"^where:4: the tokenizer's chat template"):
        encode(parse_record(CHAT_RECORD, "where:4"), tok, max_length=256)


def test_truncation_keeps_the_beginning() -> None:
    s = parse_record(QA, "f:1")
    full = encode(s, CHAT, max_length=256)
    n = len(full.input_ids)
    assert not encode(s, CHAT, max_length=n).truncated
    cut = encode(s, CHAT, max_length=n - 1)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: n - 1] and cut.labels == full.labels[: n - 1]
    prompt_len = len(prompt_ids(s, CHAT))
    none_left = encode(s, CHAT, max_length=prompt_len)
    assert none_left.truncated and set(none_left.labels) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="max_length"):
        encode(s, CHAT, max_length=0)


# ---------------------------------------------------------------------------------------------
# encoding without a chat template


def test_encode_qa_plain_fallback_labels_answer_and_eos() -> None:
    s = parse_record(QA, "f:1")
    enc = encode(s, PLAIN, max_length=256)
    assert PLAIN.decode(enc.input_ids) == (
        "Question: Where was Ada born?\nAnswer: London<|endoftext|>"
    )
    assert labelled_runs(PLAIN, enc) == [" London<|endoftext|>"]
    assert enc.labels[-1] == PLAIN.eos_token_id
    assert prompt_text(s, PLAIN) == "Question: Where was Ada born?\nAnswer:"
    bos = encode(s, PLAIN_BOS, max_length=256)
    assert bos.input_ids[0] == PLAIN_BOS.bos_token_id and bos.labels[0] == IGNORE_INDEX
    assert prompt_ids(s, PLAIN_BOS) == bos.input_ids[: len(prompt_ids(s, PLAIN_BOS))]
    assert PLAIN_BOS.decode(prompt_ids(s, PLAIN_BOS)) == "<s>Question: Where was Ada born?\nAnswer:"


def test_encode_prompt_completion_plain() -> None:
    s = parse_record({"prompt": "Once upon", "completion": " a time"}, "f:1")
    enc = encode(s, PLAIN, max_length=256)
    assert PLAIN.decode(enc.input_ids) == "Once upon a time<|endoftext|>"
    assert labelled_runs(PLAIN, enc) == [" a time<|endoftext|>"]
    assert prompt_text(s, PLAIN) == "Once upon"


def test_encode_messages_plain() -> None:
    s = parse_record(CHAT_RECORD, "f:1")
    enc = encode(s, PLAIN, max_length=256)
    assert PLAIN.decode(enc.input_ids) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello there<|endoftext|>\n"
        "User: How are you?\nAssistant: Fine<|endoftext|>"
    )
    assert labelled_runs(PLAIN, enc) == [" Hello there<|endoftext|>", " Fine<|endoftext|>"]
    assert prompt_text(s, PLAIN) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello there<|endoftext|>\n"
        "User: How are you?\nAssistant:"
    )
    assert prompt_ids(s, PLAIN) == enc.input_ids[: len(prompt_ids(s, PLAIN))]


@pytest.mark.parametrize("tok", [CHAT, PLAIN, PLAIN_BOS], ids=["chat", "plain", "plain-bos"])
def test_encode_text_labels_every_token_and_ignores_template(tok: Any) -> None:
    s = parse_record({"text": "The quick brown fox."}, "f:1")
    enc = encode(s, tok, max_length=256)
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    bos = "<s>" if tok is PLAIN_BOS else ""
    assert tok.decode(enc.input_ids) == f"{bos}The quick brown fox.{tok.eos_token}"
    with pytest.raises(DataError, match=r"^f:1: a text sample has no prompt"):
        prompt_text(s, tok)


# ---------------------------------------------------------------------------------------------
# batching


def test_collate_right_pads() -> None:
    a = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7], False)
    b = Encoded([8, 9, 10, 11, 12], [IGNORE_INDEX] * 3 + [11, 12], True)
    out = collate([a, b], pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 5) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 11, 12]]
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="labels"):
        collate([Encoded([1, 2], [1], False)], pad_id=0)


def test_iterate_batches_covers_each_index_once_deterministically() -> None:
    data = [Encoded([i], [i], False) for i in range(10)]
    batches = list(iterate_batches(data, 3, seed=1, epoch=0))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(10))
    assert list(iterate_batches(data, 3, seed=1, epoch=0)) == batches
    other_epoch = [i for b in iterate_batches(data, 3, seed=1, epoch=1) for i in b]
    other_seed = [i for b in iterate_batches(data, 3, seed=2, epoch=0) for i in b]
    assert sorted(other_epoch) == list(range(10))
    assert other_epoch != flat and other_seed != flat
    assert list(iterate_batches([], 4, seed=0, epoch=0)) == []
    with pytest.raises(ValueError):
        next(iterate_batches(data, 0, seed=0, epoch=0))


def test_first_targets_cuts_after_the_nth_target_token() -> None:
    """Position j predicts token j+1: the cut keeps the first n labelled positions and
    everything before them, and nothing after."""
    enc = Encoded([5, 6, 7, 8, 9, 10, 11], [IGNORE_INDEX] * 3 + [8, 9, 10, 11], False)
    assert enc.target_tokens == 4
    cut = enc.first_targets(2)
    assert cut.input_ids == [5, 6, 7, 8, 9] and cut.labels == enc.labels[:5]
    assert cut.target_tokens == 2 and cut.truncated
    assert enc.first_targets(4) == enc and not enc.first_targets(4).truncated
    assert enc.first_targets(9) is enc
