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
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable


class HostWorker:
    """One daemon thread running submitted jobs in order (module doc)."""

    def __init__(self, name: str = "meft-host") -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

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
            job = self._jobs.get()
            try:
                if self._error is None:  # after a failure, later jobs are dropped
                    job()
            except BaseException as err:  # handed to the thread that waits (drain)
                self._error = err
            finally:
                self._jobs.task_done()
