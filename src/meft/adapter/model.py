"""Attach MEFT adapters to a Hugging Face causal LM: ``get_meft_model`` and ``MeftModel``.

One :class:`~meft.engine.offload.OffloadedSparseAdapter` sits beside the FFN (MLP) of each chosen
decoder layer: a forward hook on the MLP adds ``adapter(mlp_input)`` to the MLP's output, so
the adapter sees exactly the post-attention-norm hidden state the FFN sees (method.md), and
the base model's modules, parameter names and ``state_dict`` stay untouched. Base weights are
frozen. Values start at zero, so at initialisation the wrapped model's logits equal the base
model's bit for bit.

Layers are found by structure, not by a class list: the decoder's layers are the longest
``nn.ModuleList`` whose blocks each own an MLP, and a block's MLP is its child named ``mlp``,
``feed_forward`` or ``ffn``, or else the child whose class name ends in ``MLP``. That covers
Llama, Mistral, Qwen2, SmolLM, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT-style blocks; a model without
such a structure gets an :class:`UnsupportedModelError` saying what was looked for.

The host tables (keys, values: N x d per layer) live in :class:`~meft.engine.store.HostStore`
objects, never in ``nn.Module`` parameters, so ``model.to(device)`` moves only the routers.
``save_pretrained`` writes ``adapter_config.json`` plus ``adapter_model.safetensors`` (sharded
with an index when large), atomically; ``MeftModel.from_pretrained`` checks that the adapter
fits the base model before loading it. An adapter with a novelty gate (``novelty_gate`` in its
config; :meth:`MeftModel.set_novelty_gate`, :mod:`meft.training.gate`) also holds
``layers.<i>.novelty`` (d+1,) per layer (with ``novelty_once`` only the first adapted layer's
decides, for all); one without loads as it always did.

In a distributed run (``parallel``, :mod:`meft.engine.distributed`) each process's stores hold only
its rows of every layer and its adapters are :class:`~meft.engine.distributed.ShardedSparseAdapter`;
``save_pretrained`` then writes one file per rank plus an index, which loads whole (``meft
eval``) or into any other number of processes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meft.adapter.serialization import (
    RowSelector,
    load_tensors,
    rank_file,
    replaced_files,
    save_rank_shard,
    save_shard_index,
    save_tensors,
)
from meft.config import CONFIG_NAME, MeftConfig
from meft.engine.disk import DiskArrays
from meft.engine.distributed import DataParallel, ShardedSparseAdapter
from meft.engine.offload import OffloadedSparseAdapter, RoutingDecision, TokenMask
from meft.engine.optim import ROW_LOCAL_STATE
from meft.engine.pipeline import HostWorker
from meft.engine.routing import router_init
from meft.engine.store import HostStore, HostTable, TransferStats
from meft.errors import (
    AdapterMismatchError,
    ConfigError,
    SerializationError,
    UnsupportedModelError,
)
from meft.sysinfo import available_host_bytes

WEIGHTS_STEM = "adapter_model"
# share of MemAvailable the host tables (+ AdamW moments) may take; measured: 18.1 GB of
# tables with 20 GB available was killed by the OOM killer once the model trained
HOST_MEMORY_FRACTION = 0.75
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def tensor_name(layer: int, part: str) -> str:
    """The name of one adapter tensor in adapter_model.safetensors (part: keys, values,
    router). The only place the file's naming is spelled out."""
    return f"layers.{layer}.{part}"


def read_adapter(directory: str | Path, *, rows: RowSelector | None = None
                 ) -> tuple[MeftConfig, dict[str, Tensor]]:
    """The config and tensors of a saved adapter directory (not yet checked against a model);
    ``rows`` reads only a row range of the tables (a distributed rank's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterMismatchError(f"{directory}: no such adapter directory")
    return MeftConfig.load(directory), load_tensors(directory, WEIGHTS_STEM, rows=rows)


def find_mlp(block: nn.Module) -> nn.Module | None:
    """The FFN of one decoder block, or None."""
    for name in MLP_NAMES:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    for child in block.children():
        if type(child).__name__.lower().endswith("mlp"):
            return child
    return None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The longest ``nn.ModuleList`` of blocks that each own an MLP."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0
                and all(find_mlp(block) is not None for block in module)
                and (best is None or len(module) > len(best))):
            best = module
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no decoder layers found (looked for an nn.ModuleList of "
            f"blocks each with a child named {', '.join(MLP_NAMES)} or a child class *MLP)")
    return best


def attach_beside_mlp(block: nn.Module, adapter: nn.Module,
                      enabled: Callable[[], bool] = lambda: True
                      ) -> list[torch.utils.hooks.RemovableHandle]:
    """Make ``block``'s MLP return ``mlp(x) + adapter(x)`` (while ``enabled()``); an adapter
    with ``prepare`` (:class:`~meft.engine.offload.OffloadedSparseAdapter`) is told the MLP's
    input before the MLP runs, so its routing overlaps the MLP on a GPU."""
    mlp = find_mlp(block)
    if mlp is None:
        raise UnsupportedModelError(f"{type(block).__name__}: no MLP child")

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             output: Tensor) -> Tensor:
        if not enabled():
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        out: Tensor = output + adapter(x).to(output.dtype)
        return out

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if enabled():  # the adapter's routing begins before the MLP runs (engine.offload)
            prepare = getattr(adapter, "prepare")  # noqa: B009 (an nn.Module attribute)
            prepare(args[0] if args else next(iter(kwargs.values())))

    handles = [mlp.register_forward_hook(hook, with_kwargs=True)]
    if hasattr(adapter, "prepare"):
        handles.append(mlp.register_forward_pre_hook(before, with_kwargs=True))
    return handles


def watch_attention_mask(model: nn.Module, tokens: TokenMask
                         ) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that hand each call's ``attention_mask`` (keyword or positional) to ``tokens``
    for the call's duration, so the adapters route real tokens only."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    position = names.index("attention_mask") if "attention_mask" in names else None

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and position is not None and len(args) > position:
            mask = args[position]
        tokens.begin(mask)

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tokens.end()

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, always_call=True)]


def pass_real_tokens(block: nn.Module, index: int, adapter: OffloadedSparseAdapter,
                     tokens: TokenMask) -> torch.utils.hooks.RemovableHandle:
    """Before each call of ``block``, tell ``adapter`` which of its tokens are real. The
    decision stays until the block's next call: transformers 5 checkpoints a layer's
    ``forward`` without its hooks, and the recomputation in backward must see it."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        adapter.keep = (tokens.for_block(index, hidden)
                        if isinstance(hidden, Tensor) and hidden.dim() == 3 else None)

    return block.register_forward_pre_hook(hook, with_kwargs=True)


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, nn.Embedding):
        return int(emb.embedding_dim)
    raise UnsupportedModelError(f"{type(model).__name__}: cannot tell the hidden size "
                                "(no config.hidden_size and no input embedding)")


def model_name_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None)
    return str(name) if name else None


class MeftModel(nn.Module):
    """A causal LM with MEFT adapters beside its FFNs. Calls go to the base model."""

    def __init__(self, base_model: nn.Module, config: MeftConfig, *,
                 device: torch.device | str | None = None,
                 tensors: dict[str, Tensor] | None = None,
                 arrays: DiskArrays | None = None,
                 parallel: DataParallel | None = None) -> None:
        super().__init__()
        if parallel is not None and arrays is not None:
            raise ConfigError("--store disk: is not supported in a distributed run yet")
        if parallel is not None and config.novelty_gate:
            raise ConfigError("the novelty gate (--retain-gate) is for one process")
        if parallel is not None and config.optim_state not in ROW_LOCAL_STATE:
            raise ConfigError(f"optim_state {config.optim_state!r} is for one process (a "
                              "distributed run shards each table's rows, and its column "
                              f"factor would differ between shards; use one of "
                              f"{', '.join(ROW_LOCAL_STATE)})")
        self.base_model = base_model
        blocks = find_decoder_layers(base_model)
        d = hidden_size_of(base_model)
        layer_ids = list(range(len(blocks))) if config.layers is None else list(config.layers)
        bad = [i for i in layer_ids if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the model has {len(blocks)} "
                              "decoder layers")
        layer_ids = sorted({i % len(blocks) for i in layer_ids})
        if tensors is None and arrays is None:
            share = parallel.local_world / parallel.world if parallel is not None else 1.0
            _check_host_memory(config, d, len(layer_ids), share=share)
        config.hidden_size, config.num_layers = d, len(blocks)
        if config.base_model is None:
            config.base_model = model_name_of(base_model)
        self.meft_config = config  # .config is the base model's (as transformers expects)
        if device is None:
            first = next(base_model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device_ = torch.device(device)
        for p in base_model.parameters():
            p.requires_grad_(False)

        self.adapters = nn.ModuleDict()
        self.tokens = TokenMask()  # the padding of the call in progress: never routed
        self._enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.arrays = arrays  # the disk store of the tables and their moments, if any
        self.parallel = parallel
        plan = parallel.plan(config.neurons, config.n_experts) if parallel is not None else None
        self.shard_plan = plan
        fresh = arrays is not None and not arrays.index.get("initialized")
        if fresh:  # tables and moments: all the space up front (meft.engine.disk)
            assert arrays is not None
            arrays.reserve(config.host_bytes_per_layer(d) * len(layer_ids))
        gen = torch.Generator().manual_seed(config.seed)
        for i in layer_ids:
            if tensors is not None:
                store = HostStore(tensors[tensor_name(i, "keys")].to(config.dtype),
                                  tensors[tensor_name(i, "values")].to(config.dtype))
                router = tensors[tensor_name(i, "router")].float()
            else:
                if arrays is not None:  # tables on disk: initialised once, then as stored
                    shape = (config.neurons, d)
                    keys = arrays.zeros(f"{i}.keys", shape, config.dtype)  # named_host_tables
                    values = arrays.zeros(f"{i}.values", shape, config.dtype)
                    if fresh:  # as HostStore.initialize draws them
                        keys.normal_(0.0, config.init_std, generator=gen)
                    store = HostStore(keys, values)
                else:
                    store = HostStore.initialize(config.neurons, d, std=config.init_std,
                                                 dtype=config.dtype, generator=gen)
                router = router_init(store.keys, config.n_experts, scheme=config.router_init,
                                     std=config.init_std, generator=gen, dtype=torch.float32)
                if arrays is not None:  # one layer's keys resident at a time (meft.engine.disk)
                    arrays.release()
                if plan is not None:  # this rank's rows of the layer one process would draw
                    lo, hi = plan.rows
                    store = HostStore(store.keys[lo:hi].clone(), store.values[lo:hi].clone())
            kwargs: dict[str, Any] = dict(top_k=config.top_k, n_probe=config.n_probe,
                                          gate=config.gate, device=self.device_,
                                          dtype=torch.float32, router=router)
            adapter: OffloadedSparseAdapter
            if plan is not None:
                assert parallel is not None
                adapter = ShardedSparseAdapter(store, plan=plan, comm=parallel.comm, **kwargs)
            else:
                adapter = OffloadedSparseAdapter(store, n_experts=config.n_experts, **kwargs)
            if config.novelty_gate:  # as saved, or open (w = 0, b = -inf) until it is set
                adapter.novelty = (tensors[tensor_name(i, "novelty")].float().to(self.device_)
                                   if tensors is not None else _open_gate(d, self.device_))
            self.adapters[str(i)] = adapter
            self._handles.extend(attach_beside_mlp(blocks[i], adapter, lambda: self._enabled))
            self._handles.append(pass_real_tokens(blocks[i], i, adapter, self.tokens))
        if config.novelty_once:
            self._share_decision()
        self._handles.extend(watch_attention_mask(base_model, self.tokens))
        # route_positions: a function of a call's whole token sequence giving the positions to
        # route, and the sequence so far of a generation with a KV cache (B, L)
        self._positions: Callable[[Tensor, Tensor], Tensor] | None = None
        self._history: Tensor | None = None
        self._deciding = False
        self._handles.append(base_model.register_forward_pre_hook(self._route_call,
                                                                  with_kwargs=True))
        self.host_worker: HostWorker | None = None
        self.use_host_worker(self.device_.type == "cuda")  # a CPU has nothing to overlap
        if fresh:
            assert arrays is not None
            arrays.index["initialized"] = True
            arrays.commit(0)

    def use_host_worker(self, on: bool = True) -> None:
        """Accumulate gradient rows on a host thread while the compute device goes on with
        the backward pass (:mod:`meft.engine.pipeline`; bitwise the same sums), or inline.
        On by default on CUDA; a sharded adapter (several processes) always adds inline."""
        if on and self.host_worker is None:
            self.host_worker = HostWorker()
        for adapter in self.adapter_modules:
            if on:
                for acc in (adapter.store.key_grad, adapter.store.value_grad):
                    acc.settle()
            adapter.worker = (self.host_worker if on and not isinstance(
                adapter, ShardedSparseAdapter) else None)

    # ----------------------------------------------------------------- plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def unload(self) -> nn.Module:
        """Remove the hooks and return the untouched base model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.base_model

    # ----------------------------------------------------------------- accessors
    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.adapters]

    @property
    def stores(self) -> list[HostStore]:
        return [a.store for a in self.adapter_modules]

    @property
    def adapter_modules(self) -> list[OffloadedSparseAdapter]:
        return [a for a in self.adapters.values() if isinstance(a, OffloadedSparseAdapter)]

    def router_parameters(self) -> list[nn.Parameter]:
        return [a.router for a in self.adapter_modules]

    def named_routers(self) -> dict[str, nn.Parameter]:
        """The device parameters (one router per layer), named by layer id."""
        return {str(i): a.router for i, a in zip(self.layer_ids, self.adapter_modules,
                                                 strict=True)}

    def named_host_tables(self) -> dict[str, HostTable]:
        """The host tables (keys and values per layer), named ``<layer>.<table>``."""
        return {f"{i}.{t.name}": t for i, s in zip(self.layer_ids, self.stores, strict=True)
                for t in s.tables}

    def set_novelty_gate(self, gates: Mapping[int, Tensor] | Mapping[str, Tensor], *,
                         once: bool = False) -> None:
        """Route, in every adapted layer, only the tokens x with x.w > b: ``gates`` maps each
        layer id to its (d+1,) tensor, w then b (:func:`meft.training.gate.fit_novelty_gate`);
        ``once``: the first adapted layer's gate decides for every layer (the tokens it passes
        are routed at all, the others at none; the later layers' gates are kept, unused).
        Saved with the adapter from now on (``novelty_gate``, ``novelty_once`` in its
        config)."""
        if self.parallel is not None:
            raise ConfigError("the novelty gate (--retain-gate) is for one process")
        given = {str(k): v for k, v in gates.items()}
        if sorted(given, key=int) != [str(i) for i in self.layer_ids]:
            raise ValueError(f"novelty gates for layers {sorted(given, key=int)}, the adapter "
                             f"has {self.layer_ids}")
        for layer, adapter in zip(self.adapters, self.adapter_modules, strict=True):
            gate = given[layer]
            if tuple(gate.shape) != (adapter.store.dim + 1,):
                raise ValueError(f"novelty gate of layer {layer}: shape {tuple(gate.shape)}, "
                                 f"expected {(adapter.store.dim + 1,)}")
            adapter.novelty = gate.detach().to(self.device_, torch.float32).clone()
            adapter.decision, adapter.decides = None, False
        if once:
            self._share_decision()
        self.meft_config.novelty_gate = True
        self.meft_config.novelty_once = once

    def route_positions(self, positions: Callable[[Tensor, Tensor], Tensor] | None) -> None:
        """Route, in every model call, only the positions ``positions(input_ids, mask)``
        (both (B, L), the call's whole sequence; returns (B, L) bool) marks: the others are
        padding to every adapter (no output, no rows, no gradient), so a sequence with no
        routed position is exactly the base model. With a KV cache the call's new tokens are
        appended to the sequence kept from its first call, and the last columns of the
        result are theirs. ``positions`` may call the model (with the adapter off: a
        pre-pass; :func:`meft.training.subject.decide`); None: route every real token.
        Not saved with the adapter (in progress, issue 37)."""
        self._positions, self._history = positions, None

    @property
    def routes_positions(self) -> bool:
        """Whether :meth:`route_positions` decides which positions are routed."""
        return self._positions is not None

    def _route_call(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        """The base model's forward pre-hook (after watch_attention_mask's): restrict the
        call's routed tokens to ``route_positions``'s."""
        if self._positions is None or self._deciding or not self._enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            raise ConfigError("routing by position needs input_ids (not inputs_embeds)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5, 4
        length = getattr(cache, "get_seq_length", None)
        cached = int(length()) if callable(length) else 0
        if cached == 0:
            self._history = ids
        elif self._history is not None and self._history.shape == (ids.shape[0], cached):
            self._history = torch.cat([self._history, ids], dim=1)
        else:
            raise RuntimeError(f"a call with {cached} cached tokens, but the sequence kept "
                               "from the first call does not match it")
        history = self._history
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, Tensor) or mask.shape != history.shape:
            mask = torch.ones_like(history)
        saved = (self.tokens.mask, self.tokens.calling)
        self._deciding = True
        try:
            routed = self._positions(history, mask)
        finally:
            self._deciding = False
            self.tokens.mask, self.tokens.calling = saved  # the pre-pass ended its own call
        self.tokens.restrict(routed.to(history.device))

    def _share_decision(self) -> None:
        """One routing decision per token: the first adapted layer makes it, the others
        follow (:class:`~meft.engine.offload.RoutingDecision`)."""
        decision, first = RoutingDecision(), min(self.layer_ids)  # the first to run
        for i, adapter in zip(self.layer_ids, self.adapter_modules, strict=True):
            adapter.decision, adapter.decides = decision, i == first

    def transfer_stats(self) -> list[TransferStats]:
        return [s.stats for s in self.stores]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: host tables, device routers; and the frozen base."""
        host = sum(2 * a.n_neurons * a.store.dim for a in self.adapter_modules)  # all ranks'

        device = sum(p.numel() for p in self.router_parameters())
        base = sum(p.numel() for p in self.base_model.parameters())
        return {"host": host, "device": device, "trainable": host + device, "base": base}

    def print_trainable_parameters(self) -> None:
        c = self.parameter_counts()
        print(f"trainable params: {c['trainable']:,} (host tables {c['host']:,}, device routers "
              f"{c['device']:,}) || base params: {c['base']:,} || trainable%: "
              f"{100 * c['trainable'] / max(1, c['base']):.2f}")

    # ----------------------------------------------------------------- files
    def adapter_state(self, *, tables: bool = True) -> dict[str, Tensor]:
        """Every adapter tensor by its file name (live tensors, not copies); ``tables=False``:
        the routers only (the tables are in a disk store)."""
        out: dict[str, Tensor] = {}
        for store in self.stores:  # an optimizer update queued on the host worker has run
            store.settle_tables()
        for i, adapter in zip(self.layer_ids, self.adapter_modules, strict=True):
            if tables:
                out[tensor_name(i, "keys")] = adapter.store.keys
                out[tensor_name(i, "values")] = adapter.store.values
            out[tensor_name(i, "router")] = adapter.router.detach()
            if self.meft_config.novelty_gate:
                assert adapter.novelty is not None
                out[tensor_name(i, "novelty")] = adapter.novelty
        return out

    def load_adapter_state(self, tensors: dict[str, Tensor], *, source: str = "adapter",
                           tables: bool = True) -> None:
        """Copy ``tensors`` (as :meth:`adapter_state` names them) into this adapter in place."""
        own = self.adapter_state(tables=tables)
        check_adapter_tensors(tensors, {k: tuple(v.shape) for k, v in own.items()}, source)
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(tensors[name])

    def save_pretrained(self, directory: str | Path, *,
                        max_shard_bytes: int = 2 * 1024**3, tables: bool = True,
                        tables_step: int | None = None) -> Path:
        """Write adapter_config.json and adapter_model*.safetensors into ``directory``.

        ``tables=False`` (a disk store): the files hold the routers and name the store and
        its step: its last commit, or ``tables_step``, the step a checkpoint about to commit
        the store gives. Saving a store changed since its last commit without one is
        refused (the files would name a state the store does not hold)."""
        directory = Path(directory)
        where: dict[str, Any] = {}
        if not tables:  # the files hold the routers; the tables stay in the disk store
            if self.arrays is None:
                raise ValueError("tables=False is for an adapter whose tables are in a disk "
                                 "store")
            if tables_step is None and self.arrays.changed:
                raise SerializationError(
                    f"the disk store {self.arrays.dir} changed since its last commit (step "
                    f"{self.arrays.step}): save a checkpoint (meft train, "
                    "MeftTrainer.save_model) or commit it first (model.arrays.commit(step))")
            where = {"tables_store": str(self.arrays.dir.resolve()),
                     "tables_step": self.arrays.step if tables_step is None else tables_step}
        config = MeftConfig.from_dict({**self.meft_config.to_dict(), "layers": self.layer_ids,
                                       "tables_store": None, "tables_step": None, **where})
        if self.parallel is not None:
            return self._save_sharded(directory, config, tables=tables)
        with replaced_files(directory, owned=lambda name: name.startswith(WEIGHTS_STEM),
                            last=CONFIG_NAME) as tmp:
            save_tensors(self.adapter_state(tables=tables), tmp, WEIGHTS_STEM,
                         max_shard_bytes=max_shard_bytes, metadata={"format": "meft"})
            config.save(tmp)
        return directory

    def _save_sharded(self, directory: Path, config: MeftConfig, *, tables: bool) -> Path:
        """Every rank writes its file; then rank 0 the index and config (a collective)."""
        par, plan = self.parallel, self.shard_plan
        assert par is not None and plan is not None
        tensors = self.adapter_state(tables=tables)
        sharded = {k for k, v in tensors.items() if plan.is_row_tensor(k, v.shape)}
        mine = rank_file(WEIGHTS_STEM, par.rank, par.world)
        if par.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        par.barrier()
        with replaced_files(directory, owned=lambda name: name == mine) as tmp:
            save_rank_shard(tensors, tmp, WEIGHTS_STEM, rank=par.rank, ranges=plan.ranges,
                            sharded=sharded, metadata={"format": "meft"})
        par.barrier()
        if par.is_main:  # the index and config last, once every rank's file is in place
            files = {rank_file(WEIGHTS_STEM, r, par.world) for r in range(par.world)}
            with replaced_files(directory, owned=lambda name: (name.startswith(WEIGHTS_STEM)
                                                               and name not in files),
                                last=CONFIG_NAME) as tmp:
                save_shard_index(tensors, tmp, WEIGHTS_STEM, ranges=plan.ranges,
                                 sharded=sharded)
                config.save(tmp)
        par.barrier()
        return directory

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path, *,
                        device: torch.device | str | None = None,
                        parallel: DataParallel | None = None) -> MeftModel:
        """Attach the adapter saved in ``directory`` to ``base_model`` (in a distributed run,
        each process reads only its rows)."""
        config = MeftConfig.load(directory) if Path(directory).is_dir() else None
        plan = (parallel.plan(config.neurons, config.n_experts)
                if parallel is not None and config is not None else None)
        config, tensors = read_adapter(directory,
                                       rows=plan.select_rows if plan is not None else None)
        blocks = find_decoder_layers(base_model)
        d = hidden_size_of(base_model)
        if config.hidden_size is not None and config.hidden_size != d:
            raise AdapterMismatchError(
                f"{directory}: adapter made for hidden size {config.hidden_size}, "
                f"but this model ({type(base_model).__name__}) has hidden size {d}")
        if config.num_layers is not None and config.num_layers != len(blocks):
            raise AdapterMismatchError(
                f"{directory}: adapter made for {config.num_layers} decoder layers, "
                f"but this model has {len(blocks)}")
        layers = config.layers or list(range(len(blocks)))
        rows = config.neurons if plan is None else plan.rows[1] - plan.rows[0]
        shapes: dict[str, tuple[int, ...]] = {tensor_name(i, part): shape for i in layers
                  for part, shape in (("keys", (rows, d)), ("values", (rows, d)),
                                      ("router", (config.n_experts, d)))}
        if config.novelty_gate:
            shapes.update({tensor_name(i, "novelty"): (d + 1,) for i in layers})
        if config.tables_store is not None and tensor_name(layers[0], "keys") not in tensors:
            if parallel is not None:
                raise ConfigError(f"{directory}: its tables are in the disk store "
                                  f"{config.tables_store}, which a distributed run cannot use")
            shapes = {k: v for k, v in shapes.items()
                      if k.endswith((".router", ".novelty"))}
            check_adapter_tensors(tensors, shapes, str(directory))
            model = cls(base_model, config, device=device, arrays=_open_tables(config))
            model.load_adapter_state(tensors, source=str(directory), tables=False)
            return model
        check_adapter_tensors(tensors, shapes, str(directory))
        return cls(base_model, config, device=device, tensors=tensors, parallel=parallel)


def _open_gate(d: int, device: torch.device) -> Tensor:
    """A novelty gate every token passes (w = 0, b = -inf), (d+1,) fp32."""
    gate = torch.zeros(d + 1, device=device)
    gate[-1] = -torch.inf
    return gate


def _open_tables(config: MeftConfig) -> DiskArrays:
    """The disk store an adapter's config points to, at the step the adapter was saved."""
    path = Path(str(config.tables_store))
    if not (path / "index.json").is_file():
        raise AdapterMismatchError(f"the adapter's tables are in the disk store {path}, which "
                                   "is gone or not a store (move the store with the adapter, "
                                   "or save the adapter with its tables)")
    arrays = DiskArrays(path)
    if arrays.step != config.tables_step:
        raise AdapterMismatchError(
            f"the adapter was saved at step {config.tables_step} of the disk store {path}, "
            f"which is now at step {arrays.step} (another run moved it on)")
    return arrays


def check_adapter_tensors(tensors: dict[str, Tensor], shapes: Mapping[str, tuple[int, ...]],
                          source: str) -> None:
    """Every expected tensor present with its expected shape, or an AdapterMismatchError."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise AdapterMismatchError(f"{source}: tensor {name} missing")
        if tuple(tensors[name].shape) != shape:
            raise AdapterMismatchError(f"{source}: tensor {name} has shape "
                                       f"{tuple(tensors[name].shape)}, expected {shape}")


def _check_host_memory(config: MeftConfig, hidden_size: int, n_layers: int, *,
                       share: float = 1.0) -> None:
    """Refuse, before allocating, host tables (with AdamW moments) that cannot fit; ``share``:
    the part of all of them this machine holds (its processes' shards)."""
    need = int(config.host_bytes_per_layer(hidden_size) * n_layers * share)
    available = available_host_bytes()
    if os.environ.get("MEFT_SKIP_MEMORY_CHECK") or available is None:
        return
    if need > HOST_MEMORY_FRACTION * available:
        raise ConfigError(
            f"neurons={config.neurons} on {n_layers} layers needs {need / 1e9:.2f} GB of host "
            f"memory (tables + AdamW moments), {available / 1e9:.2f} GB available (meft uses "
            f"at most {HOST_MEMORY_FRACTION:.0%}: the model, activations and gradients need "
            "the rest); lower --neurons or use fewer layers")


def get_meft_model(model: nn.Module, config: MeftConfig | None = None, *,
                   device: torch.device | str | None = None,
                   arrays: DiskArrays | None = None,
                   parallel: DataParallel | None = None) -> MeftModel:
    """Wrap ``model`` (any transformers causal LM) with MEFT adapters; base weights frozen.
    ``arrays``: keep the tables (and the optimizer's moments) in this disk store;
    ``parallel``: this process's share of a distributed run (its rows of every table)."""
    return MeftModel(model, config if config is not None else MeftConfig(), device=device,
                     arrays=arrays, parallel=parallel)
