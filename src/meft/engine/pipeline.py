"""The host worker: host work taken off the compute device's critical path, in order.

On a GPU, every gradient row the backward pass produces has to reach the host accumulators,
and doing it inline (``grad.to("cpu")`` in the rows' gradient hook) makes the GPU wait for the
copy and for the host's ``index_add`` before it can go on to the layers below. With a worker,
the hook only starts the copy (into a fresh pinned buffer, ``non_blocking``, a CUDA event
recorded after it) and queues the accumulation; one host thread runs the queue in submission
order, waiting for each copy's event first, while the GPU continues the backward pass.

Order is what makes it exact: the queue is FIFO and one thread runs it, so every accumulator
receives its rows in the order the synchronous path would have added them, and the sums are
bitwise the same (tested on CPU, where the worker runs the same code with no copy). Anything
that reads an accumulator (clipping, the optimizer step, a checkpoint) first waits until the
queued work is done (:meth:`meft.engine.store.RowSparseGrad.settle`); the seconds the caller
waits there are the time the compute device waits on the host, counted per layer in
``TransferStats.wait_s``. An exception in a job is raised at that wait, in the caller.

The host optimizer's update runs on the same worker (:class:`meft.engine.optim.RowSparseAdamW`
with ``worker``): after clipping (the global norm is known by then), each table's row-sparse
AdamW update is queued in layer order, then the zeroing of its gradient, and the step returns.
The next step's forward waits, layer by layer, only for the update of the tables it is about
to route with (:meth:`meft.engine.store.HostStore.settle_tables`), so on a GPU the updates of
the later layers run while the device computes the earlier ones. Each table's update is the
same code on the same rows in the same order, so the tables and moments are bitwise those of
updating inline; the gradient rows of the next backward queue behind the zeroing (FIFO).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable


class HostWorker:
    """One daemon thread running submitted jobs in order (module doc)."""

    def __init__(self, name: str = "meft-host") -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], Callable[[], None] | None]] = (
            queue.Queue())
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], *,
               always: Callable[[], None] | None = None) -> None:
        """Queue ``job``; ``always`` runs after it, also when the job is dropped because an
        earlier one failed (e.g. to release a reader waiting for it)."""
        self._jobs.put((job, always))

    def is_current(self) -> bool:
        """Whether the caller is this worker's thread (a job: everything submitted before it
        has run, so it must not wait for the queue it is part of)."""
        return threading.current_thread() is self._thread

    def drain(self) -> float:
        """Wait until every submitted job has run; return the seconds waited. Re-raises the
        first exception a job raised."""
        start = time.perf_counter()
        self._jobs.join()
        waited = time.perf_counter() - start
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return waited

    def _run(self) -> None:
        while True:
            job, always = self._jobs.get()
            try:
                if self._error is None:  # after a failure, later jobs are dropped
                    job()
            except BaseException as err:  # handed to the thread that waits (drain)
                self._error = err
            finally:
                if always is not None:
                    always()
                self._jobs.task_done()
