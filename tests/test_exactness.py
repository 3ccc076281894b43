"""meft.evaluation.exactness: a window none of whose tokens reaches a written row is bitwise
the base model, and the shares reach() reports equal a plain loop over the chosen rows."""

from __future__ import annotations

import torch

from helpers import VOCAB, meft_config, tiny
from meft.adapter.model import get_meft_model
from meft.engine.optim import RowSparseAdamW
from meft.evaluation.exactness import reach, written_rows


def _trained():  # type: ignore[no-untyped-def]
    """A tiny Llama with a large sparse adapter (N=2048, K=2, E=64, P=1) trained one step on
    one 6-token sequence: a few rows per layer are written, the rest are still zero."""
    model = get_meft_model(tiny("llama"), meft_config(neurons=2048, top_k=2, experts=64,
                                                      n_probe=1))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    host = RowSparseAdamW([t for s in model.stores for t in s.tables], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    host.step()
    return model


def test_a_fresh_adapter_is_exact_everywhere() -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    windows = torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(0))
    got = reach(model, None, windows=windows.tolist())
    assert got == {"written_rows": 0.0, "untouched_token_layers": 1.0, "untouched_tokens": 1.0,
                   "exact_windows": 1.0, "windows": 5, "tokens": 40}
    assert reach(tiny("llama"), None, windows=windows.tolist()) is None  # no meft rows


def test_windows_that_reach_no_written_row_are_bitwise_the_base_model() -> None:
    model = _trained()
    written = [written_rows(a) for a in model.adapter_modules]
    assert all(0 < int(w.sum()) <= 2 * 6 for w in written)
    gen = torch.Generator().manual_seed(1)
    exact = reached = 0
    for _ in range(60):
        ids = torch.randint(0, VOCAB, (1, 4), generator=gen)
        share = reach(model, None, windows=ids.tolist())
        assert share is not None
        with torch.no_grad():
            tuned = model(input_ids=ids).logits
            with model.disable_adapter():
                base = model(input_ids=ids).logits
        if share["exact_windows"] == 1.0:
            exact += 1
            assert torch.equal(tuned, base)
        else:
            reached += 1
            assert share["untouched_tokens"] < 1.0
    assert exact > 5 and reached > 5  # both kinds were seen


def test_shares_equal_a_plain_loop_over_the_chosen_rows() -> None:
    model = _trained()
    adapters = model.adapter_modules
    written = [set(written_rows(a).nonzero().flatten().tolist()) for a in adapters]
    windows = torch.randint(0, VOCAB, (12, 5),
                            generator=torch.Generator().manual_seed(2)).tolist()

    class Record:
        def __init__(self) -> None:
            self.ids: list[list[int]] = []

        def add(self, ids, x, keep) -> None:  # type: ignore[no-untyped-def]
            self.ids += ids.tolist()

    pairs = tokens_all = exact = 0
    for w in windows:
        records = [Record() for _ in adapters]
        for a, r in zip(adapters, records, strict=True):
            a.counter = r
        with torch.no_grad():
            model(input_ids=torch.tensor([w]))
        for a in adapters:
            a.counter = None
        untouched = [[not (set(row) & written[i]) for row in r.ids]
                     for i, r in enumerate(records)]
        pairs += sum(sum(u) for u in untouched)
        every = [all(u[t] for u in untouched) for t in range(len(w))]
        tokens_all += sum(every)
        exact += all(every)
    n = len(windows) * 5
    got = reach(model, None, windows=windows)
    assert got is not None
    assert got["untouched_token_layers"] == pairs / (n * len(adapters))
    assert got["untouched_tokens"] == tokens_all / n and got["exact_windows"] == exact / 12
    assert got["written_rows"] == sum(map(len, written)) / (2048 * len(adapters))
    assert all(a.counter is None for a in adapters)  # reach restored the counters
