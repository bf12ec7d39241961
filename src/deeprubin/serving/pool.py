"""The GP (and, in worker processes, the TCN) of classification batches, in this process or on a process pool.

:class:`Tensorizer` keeps at most ``2 × workers`` batches in flight, so memory stays bounded, and returns results in
input order. The functions here are top-level so that worker processes can run them.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

from deeprubin.lightcurves.tensorize import Curve, tensorize_curves
from deeprubin.lightcurves.tensorize_device import prepare_batch
from deeprubin.models.served import ServingModel, load_exported, predict


@functools.cache
def _blas_controller():
    """One scan of the process's BLAS libraries (threadpool_limits rescans them on every call: ms per request)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def tensorize_job(job):
    """One batch through the GP and the window policy (a top-level function: it runs in worker processes)."""
    curves, grid_days, fit_context_days, *rest = job
    interpolator = rest[0] if rest else None
    # The GP's linear algebra is many small matrices: BLAS threads only add synchronisation, and they starve
    # when torch's own threads spin between TCN batches in the same process (3.4x slower measured on 2 cores).
    with _blas_controller().limit(limits=1, user_api="blas"):
        return tensorize_curves(curves, grid_days, fit_context_days, interpolator=interpolator)


def prepare_job(job):
    """The CPU half of one batch for a GP on a device (:func:`deeprubin.lightcurves.tensorize_device.prepare_batch`):
    window, screening and the GP's input, packed; the device's process does the rest."""
    curves, grid_days, fit_context_days, *_ = job
    return prepare_batch(curves, grid_days, fit_context_days)


_WORKER_MODEL: Any = None  # the network in a worker process (see Tensorizer)
# Curves per TCN call on a CPU: the activations of 256 curves stay in cache; 1,024 at once ran 1.45x slower per curve
# on one core (same probabilities: each curve's output does not depend on its batch-mates).
TCN_BATCH = 256
WORKER_PRELOAD = ["deeprubin.serving.pool", "deeprubin.lightcurves.tensorize", "deeprubin.lightcurves.tensorize_device",
                  "threadpoolctl", "torch",
                  "torch.export.pt2_archive._package", "torch._export.serde.serialize"]


PARENT_CHECK_S = 1.0  # how often a worker checks that the run that started it is still alive


def _die_with_parent(main_pid: int | None) -> None:
    """End this worker when the run that started it ends, however it ends (kill -9 included): a worker blocks on
    its task queue, which it holds open itself, so it would otherwise live on (a model and a GP, ~1 GB).

    Linux: the kernel sends SIGKILL when the parent (the forkserver, which exits with the run, or the run itself)
    exits (``PR_SET_PDEATHSIG``). Everywhere: a daemon thread exits the process once the parent changes or the
    run's process is gone."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def gone() -> bool:
        from deeprubin.scratch import pid_alive

        return os.getppid() != parent or (main_pid is not None and not pid_alive(main_pid))

    if gone():  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if gone():
                os._exit(1)

    threading.Thread(target=watch, name="deeprubin-parent-watch", daemon=True).start()


def _init_worker(model_path: str | None, main_pid: int | None = None) -> None:
    global _WORKER_MODEL
    import torch

    _die_with_parent(main_pid)
    torch.set_num_threads(1)  # one process per core: more threads would only fight the other workers
    if model_path:
        _WORKER_MODEL = load_exported(model_path)


def _ready(_: int = 0) -> bool:
    """A no-op job: submitted when the pool is made, so the workers start at once (not at the first batch)."""
    return True


def _pack_job(job):
    """A job's curves as one array per field plus lengths: pickling 256 small ``Curve`` objects to a worker cost
    ~22 us a curve (dumps here, loads there), the packed arrays ~3 (:func:`_run_packed` unpacks them)."""
    curves, *rest = job
    if not curves or not all(type(c) is Curve for c in curves):
        return None, job
    lengths = np.fromiter((len(c.mjd) for c in curves), np.int64, len(curves))
    fields = tuple(np.concatenate([getattr(c, f) for c in curves]) for f in ("mjd", "band", "flux", "flux_err"))
    return ([c.oid for c in curves], lengths, fields), tuple(rest)


def _run_packed(fn, packed, rest):
    """``fn`` of a job packed by :func:`_pack_job`, with its curves rebuilt as views of the packed arrays."""
    if packed is None:
        return fn(rest)
    oids, lengths, fields = packed
    ends = np.cumsum(lengths)
    curves = [Curve(oid, *(f[end - n:end] for f in fields)) for oid, n, end in zip(oids, lengths.tolist(),
                                                                                  ends.tolist())]
    return fn((curves, *rest))


def _classify_job(job):
    """GP, window and (when this worker holds the network) TCN of one batch: ``(Tensors, probabilities or None)``.
    The tensors are dropped once classified: only probabilities travel back."""
    t = tensorize_job(job[:4])
    if _WORKER_MODEL is None or not len(t.rows):
        return t, None
    proba = predict(_WORKER_MODEL, t.x, TCN_BATCH, "cpu", 0)
    t.x = t.x[:0]
    return t, proba


class Tensorizer:
    """Runs the GP (:func:`tensorize_job`) in this process or on a process pool, keeping at most ``2 × workers``
    batches in flight (memory stays bounded) and returning results in input order.

    With a pool and a CPU model that has a local copy, each worker also loads the network and runs the TCN on its
    own batch (single-threaded), so the main process only reads, validates and writes: the TCN in the main process
    fought the GP workers for the two cores. Results are ``(Tensors, probabilities or None)``.

    The workers start when the pool is made; until they are up, :meth:`map` runs jobs in this process beyond the
    ``workers`` it queued, so a run does not wait idle for their imports and model load.

    ``job`` (a top-level function of one job) replaces the GP and TCN: e.g. :func:`prepare_job`, the CPU half of a
    batch whose GP and TCN run on a device in this process; results are then ``(job's result, None)`` and the
    workers load no network."""

    def __init__(self, workers: int, model: ServingModel | None = None, job=None):
        self.workers = workers
        self.job = job
        self.pool = None
        self._starting: list = []
        self._model: ServingModel | None = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                # Workers fork from a server that imported the GP path, torch and torch.export's loader once
                # (~5 s of imports per worker otherwise; a module missing from this torch is skipped).
                ctx.set_forkserver_preload(WORKER_PRELOAD)
            shipped = job is None and model is not None and model.device == "cpu" and model.local_path is not None
            self._model = model if shipped else None
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(model.local_path if shipped else None, os.getpid()))
            # Start the workers now, from a thread: the first submit blocks until the forkserver has imported torch
            # (~3 s on a cold process). Until they are up (that, then the model load), map() runs jobs here.
            self._started = threading.Event()
            self._start_error: BaseException | None = None
            self._starter = threading.Thread(target=self._start_workers, name="deeprubin-pool-start", daemon=True)
            self._starter.start()

    def _start_workers(self) -> None:
        try:
            self._starting = [self.pool.submit(_ready, i) for i in range(self.workers)]
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread by map()
            self._start_error = exc
        finally:
            self._started.set()

    def _starting_up(self, queued: int) -> bool:
        """Whether the next job should run here: the pool is still being started (a submit would block), or its
        workers are still loading and already have work queued."""
        if not self._started.is_set():
            return True
        if self._start_error is not None:
            raise self._start_error
        if self._starting and all(f.done() for f in self._starting):
            self._starting = []
        return bool(self._starting) and queued >= self.workers

    def map(self, jobs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """``(key, job)`` pairs -> ``(key, (Tensors, probabilities or None))`` in order."""
        if self.pool is None:
            for key, job in jobs:
                yield key, ((self.job or tensorize_job)(job), None)
            return
        inflight: deque = deque()
        queued = 0  # futures of the pool in ``inflight``
        for key, job in jobs:
            if self._starting_up(queued):
                # The workers are still starting (imports, model load: seconds): this process does this job
                # meanwhile (the same GP; results in input order all the same).
                inflight.append((key, _Done(self._here(job))))
            else:
                inflight.append((key, self.pool.submit(_run_packed, self.job or _classify_job, *_pack_job(job))))
                queued += 1
            while inflight and (isinstance(inflight[0][1], _Done) or queued >= 2 * self.workers):
                k, fut = inflight.popleft()
                queued -= not isinstance(fut, _Done)
                yield k, self._result(fut)
        while inflight:
            k, fut = inflight.popleft()
            yield k, self._result(fut)

    def _here(self, job):
        """One job in this process while the workers start: the GP, then the network on one thread (the workers
        have the other cores), probabilities as a worker returns them."""
        if self.job is not None:
            return self.job(job), None
        t = tensorize_job(job)
        model = self._model
        if model is None or not len(t.rows):
            return t, None
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            proba = predict(model.module, t.x, TCN_BATCH, "cpu", 0)
        finally:
            torch.set_num_threads(threads)
        t.x = t.x[:0]
        return t, proba

    def _result(self, fut):
        if isinstance(fut, _Done):
            return fut.value
        return (fut.result(), None) if self.job is not None else fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self._starter.join()
            self.pool.shutdown(cancel_futures=True)


class _Done:
    """A job's result computed in this process (in place of a future of the pool)."""

    def __init__(self, value):
        self.value = value


def resolve_workers(workers: int) -> int:
    """``classify.workers``: 0 means one GP process per core."""
    return workers or os.cpu_count() or 1
