"""Data parallelism with sharded host tables (meft.engine.distributed): the one-process run is the
specification. Multi-process tests start 2 processes with gloo on CPU (torchrun, or by hand
where a rank must die)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_worker import WRITTEN
from dist_worker import run as run_one
from helpers import TINY
from meft.adapter.model import read_adapter
from meft.adapter.serialization import load_tensors, save_rank_shard, save_shard_index, save_tensors
from meft.engine.distributed import Comm, ShardedSparseAdapter, ShardPlan
from meft.engine.routing import probe, select
from meft.engine.store import HostStore
from meft.errors import ConfigError, SerializationError

TESTS = Path(__file__).parent
WORKER = TESTS / "dist_worker.py"
# after 4 steps at lr 1e-2 (tables of magnitude ~0.08): fp32 sums in another order, amplified
# by AdamW's m / sqrt(v) where gradients are small; one process with other micro-batches
# differs by ~5e-6 the same way
ATOL = 5e-5


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(TESTS), os.environ.get("PYTHONPATH", "")]))


def torchrun(*args: str, nproc: int = 2, module: bool = False) -> subprocess.CompletedProcess:
    target = ["-m", "meft"] if module else [str(WORKER)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *target, *args], cwd=TESTS, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_adapter(a: Path, b: Path, atol: float = ATOL) -> None:
    _, ta = read_adapter(a)
    _, tb = read_adapter(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=atol, msg=name)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- in one process
def test_shard_plan_covers_the_rows_by_expert() -> None:
    plans = [ShardPlan(96, 12, 5, r) for r in range(5)]
    ranges = plans[0].ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == 96
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all((hi - lo) % 8 == 0 and hi > lo for lo, hi in ranges)  # whole experts (B=8)
    ids = torch.arange(96)
    owners = plans[0].owner_of_rows(ids)
    for r, (lo, hi) in enumerate(ranges):
        assert (owners[lo:hi] == r).all()
        assert plans[r].rows == (lo, hi)
    assert plans[2].select_rows("layers.3.keys", (96, 4)) == ranges[2]
    assert plans[2].select_rows("host.3.values.exp_avg", (96, 4)) == ranges[2]
    assert plans[2].select_rows("host.3.values.sr_step", ()) is None
    assert plans[2].select_rows("layers.3.router", (12, 4)) is None
    with pytest.raises(ConfigError, match="at least one expert"):
        ShardPlan(64, 8, 9, 0)


@pytest.mark.parametrize("gate", ["product", "none"])
@pytest.mark.parametrize("world", [2, 3])
def test_owners_top_k_merged_equal_one_process_selection(gate: str, world: int) -> None:
    """Each owner's top-K of its own candidates, merged, is select()'s top-K (fp64, fresh
    random inputs, tokens probing one owner or several)."""
    gen = torch.Generator().manual_seed(world)
    n, e, k, p, d, t = 96, 12, 8, 3, 16, 40
    for _ in range(20):
        keys = torch.randn(n, d, dtype=torch.float64, generator=gen)
        router = torch.randn(e, d, dtype=torch.float64, generator=gen)
        x = torch.randn(t, d, dtype=torch.float64, generator=gen)
        scores, pids = probe(x @ router.T, p)
        ref = select(x, keys, scores, pids, e, top_k=k, gate=gate)
        cand_s = torch.full((t, world, k), float("-inf"), dtype=torch.float64)
        cand_i = torch.zeros(t, world, k, dtype=torch.long)
        for r in range(world):
            plan = ShardPlan(n, e, world, r)
            lo, hi = plan.rows
            adapter = ShardedSparseAdapter(
                HostStore(keys[lo:hi].clone(), torch.zeros(hi - lo, d, dtype=torch.float64)),
                plan=plan, comm=Comm(r, world), router=router, top_k=k, n_probe=p, gate=gate,
                dtype=torch.float64)
            cand_s[:, r], cand_i[:, r] = adapter._score_own(x, pids, scores)
        top = cand_s.view(t, -1).topk(k, dim=1).indices
        merged = cand_i.view(t, -1).gather(1, top).sort(dim=1).values
        assert torch.equal(merged, ref)


def test_row_shards_load_whole_or_as_any_ranks_rows(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    whole = {"layers.0.keys": torch.randn(12, 3, generator=gen),
             "host.0.keys.step": torch.arange(12),
             "layers.0.router": torch.randn(4, 3, generator=gen)}
    sharded = {"layers.0.keys", "host.0.keys.step"}
    ranges = [(0, 3), (3, 9), (9, 12)]
    for r, (lo, hi) in enumerate(ranges):  # three ranks write their rows
        mine = {k: (v[lo:hi] if k in sharded else v) for k, v in whole.items()}
        save_rank_shard(mine, tmp_path, "t", rank=r, ranges=ranges, sharded=sharded)
    save_shard_index(mine, tmp_path, "t", ranges=ranges, sharded=sharded)
    loaded = load_tensors(tmp_path, "t")
    assert sorted(loaded) == sorted(whole)
    for name, tensor in whole.items():
        assert torch.equal(loaded[name], tensor)
    # two ranks of another split read only their rows; a one-file save reads the same way
    (tmp_path / "one").mkdir()
    save_tensors(whole, tmp_path / "one", "t")
    for directory in (tmp_path, tmp_path / "one"):
        part = load_tensors(directory, "t", rows=lambda name, shape: (2, 8) if name in sharded
                            else None)
        assert torch.equal(part["layers.0.keys"], whole["layers.0.keys"][2:8])
        assert torch.equal(part["host.0.keys.step"], whole["host.0.keys.step"][2:8])
        assert torch.equal(part["layers.0.router"], whole["layers.0.router"])
    (tmp_path / "t.rank-00002-of-00003.safetensors").unlink()
    with pytest.raises(SerializationError, match=r"shard t\.rank-00002-of-00003\.safetensors "
                                                 r"missing"):
        load_tensors(tmp_path, "t")


# ---------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run: 4 steps, global batch 6, micro-batches of 2."""
    out = tmp_path_factory.mktemp("one")
    run_one(out)
    return out


@pytest.mark.parametrize("variant", ["all_to_all", "all_gather", "uneven"])
def test_two_processes_train_the_adapter_one_process_trains(
        reference: Path, tmp_path: Path, variant: str) -> None:
    args = {"all_to_all": [], "all_gather": ["--gather"],
            "uneven": ["--batch", "5"]}[variant]  # 5 = 2 + 3: one rank idles a micro-batch
    torchrun(str(tmp_path), *args)
    ref = reference
    if variant == "uneven":
        ref = tmp_path / "one"
        run_one(ref, batch=5)
    assert_same_adapter(tmp_path / "adapter", ref / "adapter")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rows"] for r in ranks] == [[0, 32], [32, 64]]
    assert all(rows == [32, 32, 32] for rows in (r["store_rows"] for r in ranks))  # N/2 each
    assert ranks[0]["routers"] == ranks[1]["routers"]  # replicated exactly
    lines, ref_lines = _metrics(tmp_path), _metrics(ref)
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # rank 0 alone writes
    assert [x["loss"] for x in lines] == pytest.approx([x["loss"] for x in ref_lines], rel=1e-5)
    assert all(x["mb_comm"] > 0 for x in lines)
    index = json.loads((tmp_path / "adapter" / "adapter_model.shards.json").read_text())
    assert index["world_size"] == 2 and index["rows"] == [[0, 32], [32, 64]]


def test_checkpoints_reshard_two_to_one(reference: Path, tmp_path: Path) -> None:
    torchrun(str(tmp_path / "two"), "--stop-after", "2")
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000002"
    assert (ckpt / "optimizer.shards.json").is_file()
    run_one(tmp_path / "one", resume=str(ckpt))
    assert_same_adapter(tmp_path / "one" / "adapter", reference / "adapter")


def test_checkpoints_reshard_one_to_two(reference: Path, tmp_path: Path) -> None:
    run_one(tmp_path / "one", stop_after=2)
    ckpt = tmp_path / "one" / "checkpoints" / "step-00000002"
    assert (ckpt / "optimizer.safetensors").is_file()
    torchrun(str(tmp_path / "two"), "--resume", str(ckpt))
    assert_same_adapter(tmp_path / "two" / "adapter", reference / "adapter")


@pytest.fixture(scope="module")
def protected_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run with forgetting protection (dist_worker.protection)."""
    out = tmp_path_factory.mktemp("one-retain")
    run_one(out, retain=True)
    return out


def test_two_processes_protect_what_one_process_protects(
        protected_reference: Path, reference: Path, tmp_path: Path) -> None:
    """The same replay (rank 0's forward) and the same rows kept as written before, on sharded
    tables (the rows trained per layer summed over ranks)."""
    torchrun(str(tmp_path), "--retain")
    ref = protected_reference
    assert_same_adapter(tmp_path / "adapter", ref / "adapter")
    lines, ref_lines = _metrics(tmp_path), _metrics(ref)
    kept = [x["retained_rows_per_layer"] for x in lines]
    assert kept == [x["retained_rows_per_layer"] for x in ref_lines]
    assert all(0 < k <= 64 - len(WRITTEN) for step in kept for k in step)
    assert [x["retain_replay_loss"] for x in lines] == pytest.approx(
        [x["retain_replay_loss"] for x in ref_lines], rel=1e-4, abs=1e-7)
    assert any(x["retain_replay_loss"] > 0 for x in lines)
    _, tables = read_adapter(tmp_path / "adapter")
    values = [t for name, t in tables.items() if name.endswith(".values")]
    assert values and all(torch.equal(v[list(WRITTEN)], torch.full((2, v.shape[1]), 0.05))
                          for v in values)
    _, plain = read_adapter(reference / "adapter")  # and protection changed the training
    assert not all(torch.allclose(tables[n], plain[n], atol=ATOL) for n in tables)


def test_protected_checkpoints_reshard_two_to_one(protected_reference: Path,
                                                  tmp_path: Path) -> None:
    """The replay's state and the rows written before ride in the sharded checkpoint, and
    one process goes on from it."""
    torchrun(str(tmp_path / "two"), "--retain", "--stop-after", "2")
    run_one(tmp_path / "one", retain=True,
            resume=str(tmp_path / "two" / "checkpoints" / "step-00000002"))
    assert_same_adapter(tmp_path / "one" / "adapter", protected_reference / "adapter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_killed_rank_stops_the_other_with_one_line(tmp_path: Path) -> None:
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "--die-at", "3",
                               "--timeout", "60"], cwd=TESTS, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    start = time.monotonic()
    _, err0 = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 17  # the rank that died
    assert procs[0].returncode == 2, err0[-2000:]
    assert time.monotonic() - start < 90
    lines = [x for x in err0.strip().splitlines() if x.startswith("meft: error:")]
    assert len(lines) == 1 and "another process of this run stopped" in lines[0]
    assert "Traceback" not in err0


@pytest.mark.slow
def test_meft_train_under_torchrun_and_eval_reads_the_sharded_adapter(
        model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun("train", "--model", str(model_dir), "--data", str(data_file), "--steps", "3",
             "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--no-plots",
             "--no-retention", "--output", str(out), *TINY, module=True)
    assert (out / "adapter" / "adapter_model.rank-00002-of-00002.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("mb_comm" in json.loads(x) for x in lines)
    # protected by default, as in one process: one replayed general question per step
    # (a KL divergence: 0 up to rounding at the first step, where the adapter adds nothing)
    assert all(json.loads(x)["retain_replay_loss"] > -1e-6 for x in lines)
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2
    proc = subprocess.run([sys.executable, "-m", "meft", "eval", "--model", str(model_dir),
                           "--adapter", str(out / "adapter"), "--data", str(data_file),
                           "--max-new-tokens", "3"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout)
    assert scores["exact_match"] == pytest.approx(
        json.loads((out / "eval.json").read_text())["after"]["exact_match"])
    proc = subprocess.run([sys.executable, "-m", "meft", "info", "--adapter",
                           str(out / "adapter")], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "neurons: 64" in proc.stdout, proc.stderr[-2000:]
    # --resume under torchrun, then in one process: the run goes on from its checkpoints
    torchrun("train", "--resume", str(out), "--steps", "5", "--no-progress", module=True)
    proc = subprocess.run([sys.executable, "-m", "meft", "train", "--resume", str(out),
                           "--steps", "6", "--no-progress"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # one process's format
    assert not (out / "adapter" / "adapter_model.shards.json").exists()


def test_factored_state_is_refused_across_processes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Its column factor is shared by a table's rows, which a distributed run shards: one
    line, before any process group or model."""
    from meft.cli.commands import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--optim-state", "factored", "--host-dtype", "bfloat16",
                 "--output", str(tmp_path / "run"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("meft: error: --optim-state factored is for one process")


def test_factored_state_is_refused_by_the_python_api_across_processes() -> None:
    """The same rule for get_meft_model with a DataParallel (no process group needed: the
    model refuses before any exchange)."""
    from helpers import meft_config, tiny
    from meft import get_meft_model
    from meft.engine.distributed import DataParallel
    from meft.errors import ConfigError

    with pytest.raises(ConfigError, match="optim_state 'factored' is for one process"):
        get_meft_model(tiny("llama"), meft_config(host_dtype="bfloat16",
                                                  optim_state="factored"),
                       parallel=DataParallel(0, 2))


def test_a_background_that_differs_between_processes_stops_the_run() -> None:
    """Every rank must measure the same statistics in the same forwards: the ranks compare
    digests of their background (and rehearsal) samples first."""
    from meft.data.records import Sample
    from meft.training.protection import _digest, _same_on_every_rank

    def sample(answer: str) -> Sample:
        return Sample("qa", ({"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": answer}), "", (answer,), "t")

    class Peer:  # rank 0 of 2, summing its value with the other rank's digest
        world = 2

        def __init__(self, other: list[Sample]) -> None:
            self.other = other

        def sum(self, values: list[float]) -> list[float]:
            return [values[0] + _digest(self.other)]

    mine = [sample("Paris")]
    _same_on_every_rank(Peer([sample("Paris")]), mine)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="background or rehearsal text differs"):
        _same_on_every_rank(Peer([sample("Lyon")]), mine)  # type: ignore[arg-type]
