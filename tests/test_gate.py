"""The novelty gate (meft.training.gate, OffloadedSparseAdapter.novelty): gated-out tokens are
padding (no output, rows, gradient rows or counts), routed ones are the ungated adapter's bit
for bit; an open gate is no gate; the fit equals a plain LDA; the gate rides with the adapter
and through a stopped and resumed ``meft train``; bad settings are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from helpers import IDS, TINY, Case, files, make_inputs, meft_config, random_examples, tiny
from meft.adapter.model import MeftModel, get_meft_model, tensor_name
from meft.adapter.serialization import load_tensors
from meft.cli.commands import main
from meft.data.records import Encoded
from meft.engine.offload import OffloadedSparseAdapter
from meft.engine.store import HostStore
from meft.errors import AdapterMismatchError
from meft.evaluation.exactness import reach
from meft.training.gate import fit_novelty_gate, threshold

CASE = Case(tokens=24, dim=16, neurons=256, experts=16, top_k=8, n_probe=3)


def _adapter(novelty: Tensor | None = None) -> OffloadedSparseAdapter:
    _, keys, values, router, _ = make_inputs(CASE, torch.float32, 0)
    mod = OffloadedSparseAdapter(HostStore(keys, values), n_experts=CASE.experts,
                                 top_k=CASE.top_k, n_probe=CASE.n_probe, router=router)
    mod.novelty = novelty
    return mod


class _Accesses:
    """Counts the rows each forward chose (the adapter's ``Counter`` protocol)."""

    def __init__(self) -> None:
        self.counts = torch.zeros(CASE.neurons, dtype=torch.long)

    def add(self, ids: Tensor, x: Tensor, keep: Tensor | None) -> None:
        self.counts += torch.bincount(ids.reshape(-1), minlength=CASE.neurons)


def _run(mod: OffloadedSparseAdapter, x: Tensor, dy: Tensor, keep: Tensor | None
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, dx, dense key and value gradients, access counts of one forward and backward."""
    counter = _Accesses()
    mod.counter, mod.keep = counter, keep
    x = x.clone().requires_grad_(True)
    y = mod(x)
    y.backward(dy)
    assert x.grad is not None
    return (y.detach(), x.grad, mod.store.key_grad.to_dense(), mod.store.value_grad.to_dense(),
            counter.counts)


def test_gated_out_tokens_are_padding_and_routed_ones_are_the_ungated_adapter() -> None:
    x, _, _, _, dy = make_inputs(CASE, torch.float32, 1)
    w = torch.randn(CASE.dim, generator=torch.Generator().manual_seed(2))
    b = (x @ w).median()
    keep = torch.ones(CASE.tokens, dtype=torch.bool)
    keep[-3:] = False  # padding too
    routed = keep & (x @ w > b)
    assert 0 < int(routed.sum()) < int(keep.sum())
    y, dx, dk, dv, counts = _run(_adapter(torch.cat([w, b.reshape(1)])), x, dy, keep)
    # the reference: the ungated adapter on the routed tokens alone
    ry, rdx, rdk, rdv, rcounts = _run(_adapter(), x[routed], dy[routed], None)
    assert torch.equal(y[routed], ry) and torch.equal(dx[routed], rdx)
    assert not y[~routed].any() and not dx[~routed].any()
    assert torch.equal(dk, rdk) and torch.equal(dv, rdv)  # no gradient row of a gated token
    assert torch.equal(counts, rcounts)  # nor an access
    # the ungated adapter on every token gives the routed ones the same output
    full = _adapter()
    with torch.no_grad():
        torch.testing.assert_close(full(x)[routed], ry, rtol=1e-6, atol=1e-6)


def test_no_token_routed_gives_zeros() -> None:
    x, _, _, _, dy = make_inputs(CASE, torch.float32, 1)
    closed = torch.zeros(CASE.dim + 1)
    closed[-1] = torch.inf
    mod = _adapter(closed)
    y, dx, dk, dv, counts = _run(mod, x, dy, None)
    assert y.shape == x.shape and not y.any() and not dx.any()
    assert not dk.any() and not dv.any() and not counts.any()
    with torch.no_grad():
        assert not mod(x).any()


def _model(**kw: object) -> MeftModel:
    model = get_meft_model(tiny(), meft_config(**kw))
    gen = torch.Generator().manual_seed(5)
    for store in model.stores:
        store.values.normal_(0, 0.5, generator=gen)
    return model


def _gates(model: MeftModel, b: float, seed: int = 3) -> dict[int, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.cat([torch.randn(32, generator=gen), torch.tensor([b])])
            for i in model.layer_ids}


def _step(model: MeftModel) -> tuple[Tensor, list[Tensor]]:
    """Logits and every adapter gradient of one padded forward and backward."""
    mask = torch.ones_like(IDS)
    mask[1, 8:] = 0
    out = model(input_ids=IDS, attention_mask=mask).logits
    out.square().mean().backward()
    grads = [g for a in model.adapter_modules for g in (a.store.key_grad.to_dense(),
                                                        a.store.value_grad.to_dense(),
                                                        a.router.grad)]
    return out.detach(), grads


def test_an_open_gate_is_no_gate() -> None:
    want, want_grads = _step(_model())
    gated = _model()
    gated.set_novelty_gate(_gates(gated, -float("inf")))
    got, grads = _step(gated)
    assert torch.equal(got, want)
    assert all(torch.equal(g, h) for g, h in zip(grads, want_grads, strict=True))
    closed = _model()
    closed.set_novelty_gate(_gates(closed, float("inf")))
    with torch.no_grad(), closed.disable_adapter():
        base = closed(input_ids=IDS).logits
    with torch.no_grad():
        assert torch.equal(closed(input_ids=IDS).logits, base)  # nothing routed: the base model
    assert reach(closed, None, windows=[IDS[0].tolist()])["untouched_tokens"] == 1.0


def _first_mlp_inputs(model: MeftModel, seen: list[Tensor]) -> object:
    """A hook appending the first adapted layer's MLP input (B*S, d) of each call to seen."""
    from meft.adapter.model import find_decoder_layers, find_mlp

    mlp = find_mlp(find_decoder_layers(model.base_model)[min(model.layer_ids)])
    assert mlp is not None
    return mlp.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().reshape(-1, 32)))


def test_one_decision_per_token_routes_that_decision_at_every_layer(tmp_path: Path) -> None:
    """``once``: the first adapted layer's gate decides; the reference is the ungated model
    told to route exactly the decided tokens at every layer (the way it is told which are
    padding): the same logits and adapter gradients, bit for bit."""
    once = _model()
    gates = _gates(once, 0.0)
    once.set_novelty_gate(gates, once=True)
    assert [a.decides for a in once.adapter_modules] == [True, False, False]
    seen: list[Tensor] = []
    handle = _first_mlp_inputs(once, seen)
    got, grads = _step(once)
    handle.remove()
    real = torch.ones_like(IDS, dtype=torch.bool)
    real[1, 8:] = False
    w, b = gates[min(once.layer_ids)][:-1], gates[min(once.layer_ids)][-1]
    decided = (seen[0].float() @ w > b) & real.reshape(-1)  # (T,)
    assert 0 < int(decided.sum()) < int(real.sum())
    ref = _model()
    ref.tokens.for_block = lambda block, hidden: decided  # type: ignore[method-assign]
    want, want_grads = _step(ref)
    assert torch.equal(got, want)
    assert all(torch.equal(g, h) for g, h in zip(grads, want_grads, strict=True))
    per_layer = _model()  # each layer's own gate routes other tokens: not the same model
    per_layer.set_novelty_gate(gates)
    assert not torch.equal(_step(per_layer)[0], got)
    # it rides with the adapter: saved and loaded, still one decision per token
    once.save_pretrained(tmp_path / "once")
    loaded = MeftModel.from_pretrained(tiny(), tmp_path / "once")
    assert loaded.meft_config.novelty_once
    assert [a.decides for a in loaded.adapter_modules] == [True, False, False]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, once(input_ids=IDS).logits)


def test_a_token_the_deciding_gate_stops_is_the_base_model_at_every_layer() -> None:
    """The first layer's gate closed, the later ones open: with ``once`` nothing is routed
    anywhere and the logits are the base model's bit for bit; each layer deciding for itself,
    the later layers route every token."""
    model = _model()
    gates = _gates(model, -float("inf"))
    gates[min(model.layer_ids)][-1] = float("inf")
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=IDS).logits
    model.set_novelty_gate(gates, once=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base)
    assert reach(model, None, windows=[IDS[0].tolist()])["untouched_tokens"] == 1.0
    model.set_novelty_gate(gates)
    assert [a.decision for a in model.adapter_modules] == [None, None, None]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=IDS).logits, base)


def test_one_decision_per_token_through_a_kv_cache_equals_the_whole_sequence(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Generating token by token (a KV cache) routes as the whole sequence at once does."""
    from helpers import tiny_for

    model = get_meft_model(tiny_for(tokenizer), meft_config(top_k=4))
    gen = torch.Generator().manual_seed(5)
    for store in model.stores:
        store.values.normal_(0, 0.5, generator=gen)
    ids = torch.randint(3, len(tokenizer), (2, 14), generator=gen)
    xs = _reference_inputs(model, [Encoded(r.tolist(), r.tolist(), False) for r in ids])
    gates = {}
    for layer, x in xs.items():  # a direction half the tokens pass
        w = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        gates[layer] = torch.cat([w, torch.quantile(x @ w, 0.5).reshape(1)]).float()
    model.set_novelty_gate(gates, once=True)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(4, 14):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, whole)



def _reference_inputs(model: MeftModel, examples: list[Encoded]) -> dict[str, Tensor]:
    """Per layer, the MLP inputs of every token, one example at a time (no padding)."""
    from meft.adapter.model import find_decoder_layers, find_mlp

    blocks = find_decoder_layers(model.base_model)
    seen: dict[str, list[Tensor]] = {str(i): [] for i in model.layer_ids}
    handles = []
    for i in model.layer_ids:
        mlp = find_mlp(blocks[i])
        assert mlp is not None
        handles.append(mlp.register_forward_pre_hook(
            lambda m, args, i=i: seen[str(i)].append(args[0].reshape(-1, 32))))
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([e.input_ids]))
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def test_fit_equals_a_plain_lda_and_passes_the_share() -> None:
    model = get_meft_model(tiny(), meft_config())  # fresh: the adapter adds nothing
    train, background = random_examples(10, 1, 2, 40), random_examples(16, 2, 30, 97)
    share, shrink = 0.2, 0.1
    gates = fit_novelty_gate(model, train, background, share, shrink=shrink, batch_size=3)
    xt, xb = _reference_inputs(model, train), _reference_inputs(model, background)
    for layer in gates:
        t, bg = xt[layer], xb[layer]
        mt, mb = t.mean(0), bg.mean(0)
        s = ((t - mt).T @ (t - mt) + (bg - mb).T @ (bg - mb)) / (len(t) + len(bg) - 2)
        w = torch.linalg.solve(s + shrink * s.diagonal().mean() * torch.eye(32), mt - mb)
        b = torch.quantile(bg @ w, 1 - share) + 1e-3 * (bg @ w).std()
        torch.testing.assert_close(gates[layer], torch.cat([w, b.reshape(1)]).float(),
                                   rtol=1e-4, atol=1e-5)
        passed = float((bg.float() @ gates[layer][:-1] > gates[layer][-1]).float().mean())
        assert abs(passed - share) <= 1 / len(bg) + 1e-9
        assert float((t.float() @ gates[layer][:-1] > gates[layer][-1]).float().mean()) > share
    model.set_novelty_gate(gates)
    assert model.meft_config.novelty_gate
    with pytest.raises(ValueError, match="shape"):
        model.set_novelty_gate({k: v[:-1] for k, v in gates.items()})


def test_the_gate_rides_with_the_adapter(tmp_path: Path) -> None:
    model = _model()
    model.set_novelty_gate(_gates(model, 0.0))
    want = IDS
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "gated")
    saved = json.loads((tmp_path / "gated" / "adapter_config.json").read_text())
    assert saved["novelty_gate"] is True
    tensors = load_tensors(tmp_path / "gated", "adapter_model")
    assert tensors[tensor_name(0, "novelty")].shape == (33,)
    loaded = MeftModel.from_pretrained(tiny(), tmp_path / "gated")
    assert all(a.novelty is not None and torch.equal(a.novelty, b.novelty)  # type: ignore[arg-type]
               for a, b in zip(loaded.adapter_modules, model.adapter_modules, strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, want)
    # an adapter without the gate: no flag's effect, no tensor, loads as before
    plain = _model()
    plain.save_pretrained(tmp_path / "plain")
    assert tensor_name(0, "novelty") not in load_tensors(tmp_path / "plain", "adapter_model")
    again = MeftModel.from_pretrained(tiny(), tmp_path / "plain")
    assert all(a.novelty is None for a in again.adapter_modules)
    assert not again.meft_config.novelty_gate
    # a gate of the wrong size is refused like any other tensor
    from safetensors.torch import save_file

    tensors[tensor_name(0, "novelty")] = torch.zeros(5)
    save_file(tensors, str(tmp_path / "gated" / "adapter_model.safetensors"),
              metadata={"format": "meft"})
    with pytest.raises(AdapterMismatchError, match="novelty has shape"):
        MeftModel.from_pretrained(tiny(), tmp_path / "gated")


RUN = ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--lr", "1e-2",
       "--no-progress", "--no-plots", "--no-eval-before", "--no-retention",
       "--max-new-tokens", "2", "--retain-gate", "0.05", *TINY]



@pytest.mark.parametrize("once", [False, True])
def test_train_with_a_gate_stops_and_resumes_bitwise(model_dir: Path, data_file: Path,
                                                     tmp_path: Path, once: bool,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    background = tmp_path / "background.jsonl"  # small, so that nothing is generated
    background.write_text("".join(json.dumps({"question": f"What colour is thing {i}?",
                                              "answer": ["blue" if i % 2 else "red"]}) + "\n"
                                  for i in range(16)))
    common = ["train", "--model", str(model_dir), "--data", str(data_file), "--background",
              str(background), *(["--retain-gate-once"] if once else [])]
    assert main([*common, "--output", str(whole), *RUN]) == 0
    assert "novelty gate: " in capsys.readouterr().err
    assert main([*common, "--output", str(split), *RUN, "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0
    assert "novelty gate: " not in capsys.readouterr().err  # not fitted again: restored
    assert files(whole / "adapter") == files(split / "adapter")
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert config["novelty_gate"] is True and config["novelty_once"] is once
    assert tensor_name(0, "novelty") in load_tensors(whole / "adapter", "adapter_model")
    ckpt = load_tensors(split / "checkpoints" / "step-00000004", "optimizer")
    assert ckpt["retain.0.gate"].shape == (33,)
    losses = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert losses == again and len(losses) == 4
    assert json.loads((whole / "run.json").read_text())["config"]["train"]["retain_gate"] == 0.05
    # the gate alone, nothing replayed (--retain-replay 0): fitted on the same background
    alone = tmp_path / "alone"
    assert main([*common, "--output", str(alone), *RUN, "--retain-replay", "0"]) == 0
    assert "novelty gate: " in capsys.readouterr().err
    metrics = [json.loads(x) for x in (alone / "metrics.jsonl").read_text().splitlines()]
    assert all(not r.get("retain_replay_loss") for r in metrics)
    assert json.loads((alone / "adapter" / "adapter_config.json").read_text())["novelty_gate"]


def test_bad_gate_settings_are_one_line_errors(model_dir: Path, data_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    common = ["train", "--model", str(model_dir), "--data", str(data_file), *TINY]
    assert main([*common, "--retain-gate", "1"]) == 2
    err = capsys.readouterr().err
    assert "--retain-gate must be a number in [0, 1), got 1.0" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*common, "--retain-gate", "0.1", "--retain", "off"]) == 2
    err = capsys.readouterr().err
    assert "--retain-gate is fitted on the protection's background" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*common, "--retain-gate-once"]) == 2
    err = capsys.readouterr().err
    assert "--retain-gate-once shapes the novelty gate: it needs --retain-gate" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["bench", "--methods", "meft:4096+retain", "lora:qv:4+retain",
                 "--retain-gate", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "lora:qv:4+retain: --retain-gate is protection only meft's sparse tables" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_fits_the_gate_for_a_protected_meft_method(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from helpers import tiny_for
    from meft.cli.bench.methods import parse_method
    from meft.cli.bench.run import run_method
    from meft.config import BenchJob
    from meft.data.records import encode
    from meft.data.synthetic import make_knowledge_set

    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    job = BenchJob.from_options({"steps": 2, "batch_size": 4, "top_k": 4, "n_probe": 2,
                                 "retain_gate": 0.1, "progress": False, "eval": False})
    result = run_method(parse_method("meft:64+retain"), tiny_for(tokenizer), tokenizer, train,
                        ks.validation, ks.eval, job, torch.device("cpu"), background=ks.eval)
    assert result["adapter_config"]["novelty_gate"] is True
    assert result["train_config"]["retain_gate"] == 0.1 and len(result["losses"]) == 2


def test_the_protection_fits_the_gate_once_and_a_later_set_keeps_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """``Retainer.from_config(train=...)`` fits the gate (one decision per token when asked);
    a later set of a continual run (no ``train``) keeps the gate it has; without ``train``
    and without a gate it is an error."""
    from helpers import tiny_for
    from meft.config import TrainConfig
    from meft.data.records import encode
    from meft.data.synthetic import make_knowledge_set
    from meft.training.protection import Retainer

    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    config = TrainConfig(retain="on", retain_gate=0.3, retain_gate_once=True, progress=False)
    model = get_meft_model(tiny_for(tokenizer), meft_config(top_k=4))
    retainer = Retainer.from_config(model, config, ks.eval, tokenizer,
                                    train=train)
    assert all(a.novelty is not None for a in model.adapter_modules)
    assert [a.decides for a in model.adapter_modules] == [True] + [False] * (
        len(model.adapter_modules) - 1)
    assert "novelty gate, one decision per token" in retainer.summary()
    kept = [a.novelty.clone() for a in model.adapter_modules]  # type: ignore[union-attr]
    Retainer.from_config(model, config, ks.eval, tokenizer)
    assert all(torch.equal(a.novelty, k)  # type: ignore[arg-type]
               for a, k in zip(model.adapter_modules, kept, strict=True))
    with pytest.raises(ValueError, match="pass train="):
        Retainer.from_config(get_meft_model(tiny_for(tokenizer), meft_config(top_k=4)), config,
                             ks.eval, tokenizer)


def test_threshold_puts_a_cluster_of_near_ties_on_one_side() -> None:
    # a token every background example shares (a system prompt) has the same projection up
    # to float noise; where it lands on the quantile, its copies must not split by the noise
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(970, generator=gen, dtype=torch.float64)
    # 5 of the spread above the cluster: the bare 99% quantile falls inside it
    at = torch.quantile(spread, 0.995)
    cluster = at + 1e-7 * torch.randn(30, generator=gen, dtype=torch.float64)
    values = torch.cat([spread, cluster])
    bare = torch.quantile(values, 0.99)
    assert bool((cluster > bare).any()) and not bool((cluster > bare).all())
    b = threshold(values, 0.01)
    assert bool((cluster > b).all()) or not bool((cluster > b).any())
    assert float((values > b).double().mean()) <= 0.01
    # without ties it is the quantile, up to the tolerance
    assert abs(float(b - torch.quantile(values, 0.99))) <= 2e-3 * float(values.std())


def test_contrast_questions_ask_other_people_in_templates_the_probe_does_not() -> None:
    from meft.data.adjacent import (
        CONTRAST_PEOPLE,
        REAL_PEOPLE,
        contrast_questions,
        real_people_questions,
    )

    assert not set(CONTRAST_PEOPLE) & {name for name, _, _ in REAL_PEOPLE}
    asked = contrast_questions()
    assert len(asked) == 4 * len(CONTRAST_PEOPLE)
    probe = {s.messages[0]["content"] for s in real_people_questions()}
    for s in asked:
        assert s.messages[0]["content"] not in probe
        assert not any(name in s.messages[0]["content"] for name, _, _ in REAL_PEOPLE)


def test_the_contrast_joins_the_gates_background_with_the_models_own_answers(tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """``--retain-gate-contrast``: the gate is the one fitted on the training examples against
    the replay pool plus the contrast questions answered by the model itself; a contrast
    without questions, or without a gate, is a one-line error."""
    from helpers import tiny_for
    from meft.config import TrainConfig, TrainJob
    from meft.data.records import encode
    from meft.data.synthetic import make_knowledge_set
    from meft.errors import ConfigError
    from meft.training.gate import contrast_examples
    from meft.training.protection import REPLAY_TOKENS, Retainer

    ks = make_knowledge_set(3, seed=0)
    train = [encode(s, tokenizer, 64) for s in ks.train]
    config = TrainConfig(retain="on", retain_gate=0.3, retain_gate_contrast="people",
                         progress=False)

    def fresh() -> MeftModel:
        torch.manual_seed(0)
        return get_meft_model(tiny_for(tokenizer), meft_config(top_k=4))

    model = fresh()
    Retainer.from_config(model, config, ks.eval, tokenizer, train=train)
    want_model = fresh()
    contrast = contrast_examples(want_model, tokenizer, "people", max_length=config.max_length,
                                 progress=False)
    assert len(contrast) == 240 and all(any(y != -100 for y in e.labels) for e in contrast)
    pool = [encode(s, tokenizer, config.max_length).first_targets(REPLAY_TOKENS)
            for s in ks.eval]
    want = fit_novelty_gate(want_model, train, pool + contrast, 0.3)
    without = fit_novelty_gate(want_model, train, pool, 0.3)
    for layer, a in zip(model.adapters, model.adapter_modules, strict=True):
        torch.testing.assert_close(a.novelty, want[layer])
        assert not torch.allclose(a.novelty, without[layer])  # type: ignore[arg-type]
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "Plain text, no question."}) + "\n")
    with pytest.raises(ConfigError, match="no questions"):
        contrast_examples(fresh(), tokenizer, str(text), max_length=64, progress=False)
    with pytest.raises(ConfigError, match="needs --retain-gate"):
        TrainJob.from_options({"data": "x.jsonl", "retain": "on",
                                "retain_gate_contrast": "people"})
