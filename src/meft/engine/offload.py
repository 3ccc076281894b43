"""The offloaded sparse adapter: big tables on the host, only the rows in use on the device.

Per forward of one layer, for x (T, d) on the compute device:

    device  g = x W_g^T (T, E); probe the top-P experts        router is a device Parameter
    d -> h  x (T*d), probe ids and gate values (T*P each)
    host    select each token's K neurons among the P*B candidates   (meft.engine.routing.select)
            U, local = unique(ids)                                    (U,), (T, K)
    h -> d  key rows and value rows of U (2*U*d), U ids, local (T, K)
    device  y = sparse_rows(x, gsel, ku, vu, local)                  exact, differentiable

and in backward the (U, d) gradients of ku and vu go device -> host (2*U*d) and are added to the
store's row-sparse accumulators; several micro-batches accumulate. The host tables are never
module parameters or buffers, so ``model.to(device)`` and ``state_dict()`` leave them alone; the
trainer builds the :class:`~meft.engine.store.HostStore` objects and the optimizer and passes them
in.

Half-precision tables (bf16) route in their dtype: the candidate scores multiply x and the
keys in bf16, and so does probing: g = x W_g^T is computed in bf16 for the top-P, then the
exact router scores of the P probed experts (T*P dots in x's dtype) give the gate values, so
the output and every gradient keep x's precision; only the choice of experts sees bf16
rounding. At E=1024, T=512 probing takes 1.5 ms per layer on the project CPU against 3.1-3.4
in fp32 (benchmarks/results/step-time/ratio-5c1717f).

Overlap with the device (a GPU). The adapter sits beside the MLP, so the MLP does not need
its output: the MLP's forward pre-hook calls :meth:`OffloadedSparseAdapter.prepare`, which
probes the router and starts the copies of the tokens and probes to the host (pinned,
``non_blocking``, an event recorded) before the MLP's kernels are queued; the forward hook then
waits for those copies only and routes on the host while the device computes the MLP. In
backward the rows' gradients go to the host accumulators through the host worker
(:mod:`meft.engine.pipeline`). Both give bitwise the values of doing everything inline
(tested on CPU, where the same code runs with no copy).

Staged rows are gathered straight into reused host buffers (:class:`_StagingPool`). On CUDA
those are pinned and copied with ``non_blocking=True`` on a side stream, which the compute
stream then waits for: the copy does not queue behind the MLP's kernels. On CPU (device ==
host) with tables in the compute dtype nothing is staged: the kernels read the rows of U in
the tables in place (:func:`meft.engine.kernels.sparse_rows` with ``tables``), bitwise the
same result; with compact tables (bf16) the rows are converted into the reused buffer. Every
byte the real system moves is counted in ``store.stats`` even where the "copy" is free.

Padding is never routed. :class:`TokenMask` holds the attention mask of the model call in
progress (set by :class:`~meft.adapter.model.MeftModel` from the ``attention_mask`` argument), and a
pre-hook on each decoder block hands the adapter its real tokens as ``keep`` (also when
gradient checkpointing recomputes the block in backward). The adapter routes only those and
returns 0 at padded positions. Padding therefore chooses no rows, moves no bytes and leaves no
(zero) gradient rows behind, so the lazy AdamW never gives a row a momentum-only step because
a pad chose it, and training is the same however examples are padded into micro-batches.
Without a mask (a direct call, packed inputs) every token is routed.

The novelty gate (``novelty``, (d+1,): a direction w and a threshold b; None: off) routes
only the tokens that look like the training data: a real token x is routed iff x.w > b
(in fp32); every other token is treated as padding (output 0, no rows, no gradient rows,
no access counts). :meth:`_tokens` combines the two, so :meth:`prepare`, :meth:`forward` and
the access counter all see the same routed tokens. The gate is fitted before training
(:mod:`meft.training.gate`) and saved with the adapter (``layers.<i>.novelty``). Zero routed
tokens give a zero output. With ``novelty`` None nothing changes, bit for bit. With a shared
:class:`RoutingDecision` (``decision``), the adapter with ``decides`` (the first adapted layer)
applies its gate and records which tokens passed; every later adapter of the call routes
exactly those, whatever its own gate says: one decision per token, not one per (token, layer),
so a token that does not pass is exactly the base model at every layer.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from meft.engine.kernels import gate_values, gradient_carrier, pair_dots, rows_output, sparse_rows
from meft.engine.pipeline import HostWorker
from meft.engine.routing import HALF_DTYPES, probe, router_init, routing_dtype, select
from meft.engine.sizes import check_routing_sizes
from meft.engine.store import HostStore, RowSparseGrad


class Counter(Protocol):
    """Receives each forward's chosen ids (T, K) and host inputs (T, d)
    (:mod:`meft.evaluation.exactness`)."""

    def add(self, ids: Tensor, x: Tensor, keep: Tensor | None) -> None: ...

_HOST = torch.device("cpu")


class TokenMask:
    """The attention mask (B, L) of the model call in progress, shared by a model's adapters.

    :meth:`for_block` maps it onto one decoder block's input (B, S, d): the last S columns
    (with a KV cache the new tokens come last), flattened to (T,) = (B*S,) bool; None (route
    every token) when no mask is set, it does not match the input's shape, or no token is
    padding. Gradient checkpointing recomputes a block during backward, after the call has
    ended. Where the recomputation runs the block's hooks (checkpointing ``__call__``), the
    block's input is the same tensor (or a detached view of its storage), so the decision
    made in the forward is remembered by input storage and shape, and reused; where it does
    not (transformers 5 checkpoints ``forward``), the adapter keeps its last decision."""

    REMEMBERED = 256  # decisions kept per block: forwards whose graphs may still be alive

    def __init__(self) -> None:
        self.mask: Tensor | None = None  # (B, L) bool
        self.calling = False  # a model call is in progress (with or without a mask)
        self._seen: dict[int, OrderedDict[tuple[int, tuple[int, ...]], Tensor | None]] = {}

    def begin(self, mask: object) -> None:
        """A model call starts, with ``mask`` (None or not (B, L): every token is real)."""
        self.mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self.calling = True

    def end(self) -> None:
        self.mask, self.calling = None, False

    def restrict(self, routed: Tensor) -> None:
        """Route, in the call in progress, only the real tokens ``routed`` (B, L) bool marks
        (:meth:`meft.adapter.model.MeftModel.route_positions`); the others are padding."""
        mask = self.mask if self.mask is not None else torch.ones_like(routed, dtype=torch.bool)
        if mask.shape != routed.shape:
            raise RuntimeError(f"routed positions {tuple(routed.shape)} for a call whose mask "
                               f"is {tuple(mask.shape)}")
        self.mask = mask & routed.to(mask.device, torch.bool)

    def rows(self, shape: torch.Size) -> Tensor | None:
        """(T,) bool over the tokens of an input of leading shape (B, S), or None: all real."""
        mask = self.mask
        if mask is None or len(shape) != 2 or mask.shape[0] != shape[0] \
                or mask.shape[1] < shape[1]:
            return None
        keep = mask[:, mask.shape[1] - shape[1]:].reshape(-1)  # (T,)
        return None if bool(keep.all()) else keep

    def for_block(self, block: int, hidden: Tensor) -> Tensor | None:
        """The real tokens of a call of decoder block ``block`` on ``hidden`` (B, S, d)."""
        seen = self._seen.setdefault(block, OrderedDict())
        key = (hidden.untyped_storage().data_ptr()
               + int(hidden.storage_offset()) * hidden.element_size(), tuple(hidden.shape))
        if not self.calling:  # a recomputation in backward (or a direct call of the block)
            return seen.get(key)
        keep = self.rows(hidden.shape[:-1])
        seen[key] = keep
        seen.move_to_end(key)
        while len(seen) > self.REMEMBERED:
            seen.popitem(last=False)
        return keep


class _Front(NamedTuple):
    """The device's share of one call's routing (:meth:`OffloadedSparseAdapter._front`)."""

    g: Tensor  # (T, E) router scores (exact at the probed experts)
    probe_scores: Tensor  # (T, P)
    probe_ids: Tensor  # (T, P)
    x_host: Tensor  # (T, d) the tokens on the host, in the routing dtype
    scores_host: Tensor  # (T, P)
    ids_host: Tensor  # (T, P)
    landed: Any  # a CUDA event recorded after the copies (None: they are done)


def _to_host(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as ``dtype`` on the host: on CUDA a non-blocking copy into a fresh pinned buffer
    (valid once the caller's event has completed), elsewhere an ordinary conversion."""
    if t.device.type != "cuda":
        return t.to(_HOST, dtype)
    out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    out.copy_(t.to(dtype), non_blocking=True)
    return out


def _distinct(ids: Tensor, n: int) -> int:
    """How many distinct values in [0, n) ``ids`` holds (U, without sorting them)."""
    seen = torch.zeros(n, dtype=torch.bool, device=ids.device)
    return int(seen.index_fill_(0, ids.reshape(-1), True).sum())


class _StagingPool:
    """Reusable host buffers for staged rows, so staging never pays for fresh memory.

    A fresh 50 MB tensor costs more than the gather that fills it (the OS must fault in and
    zero its pages: index_select of 25k x 576 fp32 rows measured 21 ms fresh, 4 ms into a
    reused buffer). A buffer is handed out again only when it is free:
    on CPU the rows are used in place, so it is free once the view handed out is gone (its
    autograd graph released); on CUDA the buffer is pinned and only the source of a
    non-blocking copy, so it is free once the event recorded behind that copy has completed.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._entries: dict[str, list[list[Any]]] = {}  # name -> [buffer, weakref, event]

    def acquire(self, name: str, n: int, tail: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        entries = self._entries.setdefault(name, [])
        for entry in entries:
            buf, ref, event = entry
            if ref is not None and ref() is not None:
                continue
            if event is not None and not event.query():
                continue
            if buf.dtype != dtype or buf.shape[1:] != tail:
                continue
            if buf.shape[0] < n:
                buf = entry[0] = self._new(n, tail, dtype)
            return self._hand_out(entry, buf[:n])
        entry = [self._new(n, tail, dtype), None, None]
        if len(entries) < 4:  # a bounded pool; beyond it, buffers are plain temporaries
            entries.append(entry)
        return self._hand_out(entry, entry[0][:n])

    def _new(self, n: int, tail: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty((max(1, n + n // 8), *tail), dtype=dtype, pin_memory=self.pinned)

    def _hand_out(self, entry: list[Any], view: Tensor) -> Tensor:
        entry[1] = None if self.pinned else weakref.ref(view)
        entry[2] = None
        return view

    def record(self, name: str, view: Tensor, stream: Any = None) -> None:
        """CUDA: remember the event behind the copy out of ``view``'s buffer (queued on
        ``stream``, default the current one)."""
        for entry in self._entries.get(name, []):
            if entry[0].data_ptr() == view.data_ptr():
                event = torch.cuda.Event()
                event.record(stream)
                entry[2] = event


class RoutingDecision:
    """Which tokens of the model call in progress passed the novelty gate of the layer that
    decides (``passed``, (T,) bool), for the later layers of the same call to route (the
    recomputation of a checkpointed layer in backward finds the same call's)."""

    def __init__(self) -> None:
        self.passed: Tensor | None = None

    def of(self, tokens: int) -> Tensor:
        """The decision for a call of ``tokens`` tokens (T,) bool."""
        if self.passed is None or self.passed.shape[0] != tokens:
            raise RuntimeError(f"no routing decision for this call's {tokens} tokens: the "
                               "deciding (first adapted) layer did not run on them")
        return self.passed


class OffloadedSparseAdapter(nn.Module):
    """MEFT adapter for one layer: y = adapter(x) with x (..., d), to be added to the FFN output.

    ``store`` holds keys and values (N, d) on the host; ``n_experts`` E must divide N. The router
    (E, d) is a Parameter on ``device``. Gradients for keys and values land in
    ``store.key_grad`` / ``store.value_grad``; the router's in ``router.grad``.
    """

    def __init__(
        self,
        store: HostStore,
        *,
        n_experts: int,
        top_k: int = 64,
        n_probe: int = 8,
        gate: str = "product",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router: Tensor | None = None,
        router_scheme: str = "normal",
        generator: torch.Generator | None = None,
        n_neurons: int | None = None,
    ) -> None:
        super().__init__()
        self._n_neurons = n_neurons if n_neurons is not None else store.n_neurons
        check_routing_sizes(self._n_neurons, n_experts, top_k=top_k, n_probe=n_probe, gate=gate)
        self.store = store
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_probe = n_probe
        self.gate = gate
        self.device = torch.device(device) if device is not None else _HOST
        dtype = dtype or store.keys.dtype
        if router is None:
            router = router_init(store.keys, n_experts, scheme=router_scheme, generator=generator)
        if router.shape != (n_experts, store.dim):
            raise ValueError(f"router must be ({n_experts}, {store.dim}), got "
                             f"{tuple(router.shape)}")
        self.router = nn.Parameter(router.to(self.device, dtype))
        self._staging = _StagingPool(pinned=self.device.type == "cuda")
        self._copy_stream: Any = None  # CUDA: the side stream staged rows are copied on
        self.counter: Counter | None = None  # set while reach() counts accesses (exactness)
        self.keep: Tensor | None = None  # (T,) real tokens of the block call, set by MeftModel
        self.novelty: Tensor | None = None  # (d+1,) fp32 novelty gate: w then b (None: off)
        # one routing decision per token shared by the layers (None: each layer's own gate);
        # the adapter that ``decides`` makes it, the others route what it decided
        self.decision: RoutingDecision | None = None
        self.decides = False
        # on CPU, kernels read rows in the tables (False: always stage, the reference path)
        self.read_in_place = True
        # gradient rows accumulated on a host thread (meft.engine.pipeline; None: inline)
        self.worker: HostWorker | None = None
        self._prepared: tuple[Tensor, _Front] | None = None  # (x, its routing begun)
        for acc in (store.key_grad, store.value_grad):
            acc.on_wait = self._waited

    def _waited(self, seconds: float) -> None:
        self.store.stats.wait_s += seconds

    @property
    def n_neurons(self) -> int:
        """N of the whole layer (a sharded adapter's store holds only some rows)."""
        return self._n_neurons

    def extra_repr(self) -> str:
        return (f"neurons={self.n_neurons}, dim={self.store.dim}, experts={self.n_experts}, "
                f"top_k={self.top_k}, n_probe={self.n_probe}, gate={self.gate!r}, "
                f"device={self.device}")

    def _stage(self, name: str, src: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """src[rows] as ``dtype`` on the compute device, gathered into a reused host buffer."""
        buf = self._staging.acquire(name, rows.shape[0], tuple(src.shape[1:]), dtype)
        if src.dtype == dtype:
            torch.index_select(src, 0, rows, out=buf)
        else:
            buf.copy_(src.index_select(0, rows))
        if self.device.type == "cpu":
            return buf
        if not self._staging.pinned:
            return buf.to(self.device)
        # the copy runs on a side stream, so it need not wait behind the kernels already
        # queued (the MLP beside the adapter); the compute stream waits for it before use
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = buf.to(self.device, non_blocking=True)
        self._staging.record(name, buf, self._copy_stream)
        compute.wait_stream(self._copy_stream)
        moved.record_stream(compute)  # allocated on the side stream, used on the compute one
        return moved

    def prepare(self, x: Tensor) -> None:
        """Start this call's routing before the base MLP runs on ``x`` (the MLP's forward
        pre-hook, :func:`meft.adapter.model.attach_beside_mlp`): probe the router and start
        copying to the host what it routes with, without blocking. On a GPU the host then
        routes while the device computes the MLP beside it; :meth:`forward` on the same ``x``
        finds the work begun. The same values in the same order as doing it all in forward."""
        x2, _, real = self._tokens(x)
        self.store.settle_tables()  # a queued optimizer update of these tables has run
        self._prepared = (x, self._front(x2 if real is None else x2.index_select(0, real)))

    def forward(self, x: Tensor) -> Tensor:
        prepared, self._prepared = self._prepared, None
        front = prepared[1] if prepared is not None and prepared[0] is x else None
        self.store.settle_tables()
        x2, routed, real = self._tokens(x)
        if real is None:
            return self._adapt(x2, None, front).reshape(x.shape)
        y = self._adapt(x2.index_select(0, real), routed, front)  # (T', d)
        return x2.new_zeros(x2.shape).index_copy(0, real, y.to(x2.dtype)).reshape(x.shape)

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x as (T, d), the tokens to route (T,) bool and their positions (T',): the real
        tokens that pass the novelty gate (None, None: route them all)."""
        d = self.store.dim
        if x.shape[-1] != d:
            raise ValueError(f"adapter input must have last dimension {d}, got {tuple(x.shape)}")
        x2 = x.reshape(-1, d)  # (T, d)
        keep = self.keep
        if keep is not None and keep.shape[0] != x2.shape[0]:
            keep = None
        if self.novelty is not None:
            if self.decision is None:
                novel = self.novel(x2)  # (T,)
            elif self.decides:
                novel = self.decision.passed = self.novel(x2)
            else:
                novel = self.decision.of(x2.shape[0])
            keep = novel if keep is None else keep.to(x.device) & novel
        if keep is None:
            return x2, None, None
        return x2, keep, keep.to(x.device).nonzero().squeeze(1)

    def novel(self, x2: Tensor) -> Tensor:
        """(T,) bool: the tokens x2 (T, d) the novelty gate lets through, x.w > b in fp32."""
        assert self.novelty is not None
        w, b = self.novelty[:-1], self.novelty[-1]
        with torch.no_grad():
            return (x2.detach().float() @ w) > b

    def _front(self, x2: Tensor) -> _Front:
        """The device's share of routing x2 (T, d): router scores, the top-P probes, and the
        copies of the tokens and probes to the host, begun (on CUDA: into pinned buffers,
        ``non_blocking``, with an event to wait for)."""
        router = self.router.to(x2.dtype)
        # routing runs in the tables' dtype (fp32 for half tables where half is slow)
        route_dtype = routing_dtype(self.store.keys.dtype)
        with torch.no_grad():  # the gradient goes through gate_values, probed experts only
            if route_dtype in HALF_DTYPES and x2.dtype != route_dtype:
                g, probe_scores, probe_ids = self._probe_in_half(x2, router, route_dtype)
            else:
                g = x2 @ router.T  # (T, E)
                probe_scores, probe_ids = probe(g, self.n_probe)  # (T, P) each
            start = time.perf_counter()
            host = [_to_host(x2.detach(), route_dtype), _to_host(probe_scores, route_dtype),
                    _to_host(probe_ids, probe_ids.dtype)]
            landed = None
            if x2.device.type == "cuda":
                landed = torch.cuda.Event()
                landed.record()
            self.store.stats.route_s += time.perf_counter() - start
        return _Front(g, probe_scores, probe_ids, host[0], host[1], host[2], landed)

    def _adapt(self, x2: Tensor, keep: Tensor | None, front: _Front | None = None) -> Tensor:
        """y (T, d) for the tokens x2 (T, d) to route; ``keep`` (T_all,) which of the call's
        tokens they are (None: all), for the access counter; ``front`` from :meth:`prepare`."""
        stats = self.store.stats
        router = self.router.to(x2.dtype)
        front = front if front is not None else self._front(x2)
        g, probe_scores, probe_ids = front.g, front.probe_scores, front.probe_ids
        start = time.perf_counter()
        if front.landed is not None:
            front.landed.synchronize()  # the copies only: the MLP's kernels go on
        x_host = front.x_host
        ids = self._route(x_host, front.scores_host, front.ids_host)  # (T, K) on host
        if self.counter is not None:
            self.counter.add(ids, x_host, keep)
        tables = self._tables_in_place(x2.dtype)
        b = self.n_neurons // self.n_experts
        if tables is not None and not torch.is_grad_enabled():
            # inference with the rows read in place (generation on CPU): nothing is staged
            # and no gradient goes back, so the union U is needed only for its size; the
            # output is bitwise the one sparse_rows gives (tested)
            routed = time.perf_counter()
            stats.route_s += routed - start
            self._count(x2, _distinct(ids, self.n_neurons), probe_ids, probe_scores, ids.numel())
            gsel = g.gather(1, ids // b) if self.gate == "product" else None
            return rows_output(x2, gsel, tables[0], tables[1], ids)[0]
        uniq, local = torch.unique(ids, return_inverse=True)  # (U,), (T, K)
        routed = time.perf_counter()

        if tables is None:
            ku, vu = self._fetch(uniq, x2.dtype)  # (U, d) each, on the compute device
        else:  # read in place by the kernels; ku, vu only receive the (U, d) gradients
            ku, vu = gradient_carrier(x2, uniq.shape[0]), gradient_carrier(x2, uniq.shape[0])
        uniq_dev = uniq.to(self.device)
        local_dev = local.to(self.device)
        stats.stage_s += time.perf_counter() - routed
        stats.route_s += routed - start
        self._count(x2, uniq.shape[0], probe_ids, probe_scores, local.numel())

        if torch.is_grad_enabled():
            key_acc, value_acc = self._accumulators()
            ku.requires_grad_(True)
            vu.requires_grad_(True)
            ku.register_post_accumulate_grad_hook(self._grad_sink(key_acc, uniq))
            vu.register_post_accumulate_grad_hook(self._grad_sink(value_acc, uniq))

        gsel = (gate_values(x2, router, g, probe_ids, uniq_dev[local_dev] // b)
                if self.gate == "product" else None)
        return sparse_rows(x2, gsel, ku, vu, local_dev, tables=tables,
                           ids=None if tables is None else ids)

    def _count(self, x2: Tensor, u: int, probe_ids: Tensor, probe_scores: Tensor,
               tk: int) -> None:
        """Add one forward of x2 (T, d) with a union of U rows and T*K = ``tk`` chosen slots
        to the store's transfer counts: the bytes the real system moves (module doc), also
        where the "copy" is free."""
        stats = self.store.stats
        t, d = x2.shape
        item = x2.element_size()
        stats.forwards += 1
        stats.tokens += t
        stats.union_rows += u
        stats.hidden_bytes_d2h += t * d * item
        stats.index_bytes_d2h += probe_ids.numel() * probe_ids.element_size()
        stats.index_bytes_d2h += probe_scores.numel() * probe_scores.element_size()
        stats.row_bytes_h2d += 2 * u * d * item
        stats.index_bytes_h2d += (u + tk) * 8  # U ids and local (T, K), int64

    def _probe_in_half(self, x2: Tensor, router: Tensor, dtype: torch.dtype
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Probing with half-precision tables (module doc): the router product in ``dtype``
        (as the candidate scores are computed), and g (T, E) in x2's dtype holding the exact
        router scores at each token's P probed experts (zero elsewhere: gate values only
        read those). Returns g and the probes' scores and ids (T, P)."""
        g_half = x2.to(dtype) @ router.to(dtype).T  # (T, E)
        probe_scores, probe_ids = probe(g_half, self.n_probe)  # (T, P) each
        exact = pair_dots(x2, router, probe_ids)  # (T, P): x_t . router[probe_{t,p}]
        return (x2.new_zeros(g_half.shape).scatter_(1, probe_ids, exact), probe_scores,
                probe_ids)

    # The three steps a sharded adapter (meft.engine.distributed) does across ranks instead.
    def _route(self, x: Tensor, probe_scores: Tensor, probe_ids: Tensor) -> Tensor:
        """Each token's K neuron ids (T, K), global, from its probes (method steps 2-3)."""
        return select(x, self.store.keys, probe_scores, probe_ids, self.n_experts,
                      top_k=self.top_k, gate=self.gate)

    def _tables_in_place(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The store's tables when the kernels can read their rows where they are (the compute
        device is the host and the tables are in ``dtype``), else None: rows are staged."""
        keys, values = self.store.keys, self.store.values
        if (not self.read_in_place or self.device.type != "cpu" or keys.dtype != dtype
                or values.dtype != dtype):
            return None
        return keys, values

    def _fetch(self, uniq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Key and value rows of ``uniq`` (U,) as ``dtype`` on the compute device."""
        return (self._stage("keys", self.store.keys, uniq, dtype),
                self._stage("values", self.store.values, uniq, dtype))

    def _accumulators(self) -> tuple[RowSparseGrad, RowSparseGrad]:
        """Where the key and value gradient rows of global ids go."""
        return self.store.key_grad, self.store.value_grad

    def _grad_sink(self, acc: RowSparseGrad, uniq: Tensor) -> Callable[[Tensor], None]:
        stats = self.store.stats

        def hook(rows: Tensor) -> None:
            grad = rows.grad
            if grad is None:
                return
            rows.grad = None
            stats.grad_bytes_d2h += grad.numel() * grad.element_size()
            if self.worker is None:  # synchronous: the reference the worker path equals
                acc.add(uniq, grad.to(_HOST, acc.dtype), adopt=True)
            elif grad.device.type == "cuda":  # copy started now, added once it has landed
                host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                host.copy_(grad, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record()
                acc.add_later(self.worker, uniq, host, ready=landed.synchronize, adopt=True)
            else:
                acc.add_later(self.worker, uniq, grad.to(_HOST, acc.dtype), adopt=True)

        return hook
