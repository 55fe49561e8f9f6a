"""Running a conversion's tasks: inline, in local processes, or as Ray tasks on a cluster.

Ray: `address="local"` starts a private local Ray for the conversion (and shuts it down); `"auto"` or
`"host:port"` / `"ray://..."` connects to a running cluster (and disconnects at the end, leaving the
cluster up). When this process is already connected (`ray.is_initialized()`, e.g. inside a Ray job),
that connection is used as it is. Every node must be able to import `data_prep` (the package
installed, as on the project's cluster image) and see the input and output paths (shared storage).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextmanager
def ray_session(address: str, num_cpus: int):
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address == "local":
        # a private Ray for this command only: address="local" never joins a Ray already running on the
        # host (another user's, a test's); token auth stays at Ray's default
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()  # disconnects this driver; a cluster we connected to keeps running


class Executor:
    """One pool (or one Ray connection) for all of a conversion's tasks: started once, used by each pass.

    `run(fn, calls)` yields `(i, fn(*calls[i]))` as tasks finish (any order; callers never depend on
    it). With one worker and no Ray address it runs inline, in this process.
    """

    def __init__(self, workers: int = 1, ray_address: str | None = None):
        self.workers, self.ray_address = workers, ray_address
        self._stack = ExitStack()
        self._pool = self._ray = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def run(self, fn: Callable, calls: list[tuple]) -> Iterator[tuple[int, Any]]:
        if not calls:
            return
        if self.ray_address:
            if self._ray is None:  # started on first use: a run with nothing left to do starts nothing
                self._ray = self._stack.enter_context(ray_session(self.ray_address, self.workers))
            yield from _run_ray(self._ray, fn, calls)
        elif self.workers <= 1 or len(calls) == 1:
            for i, args in enumerate(calls):
                yield i, fn(*args)
        else:
            if self._pool is None:
                # spawn, not fork: the parent may hold threads (a Ray client, a test runner) that fork
                # would copy in an unusable state
                ctx = multiprocessing.get_context("spawn")
                self._pool = self._stack.enter_context(ProcessPoolExecutor(self.workers, mp_context=ctx))
            yield from _run_pool(self._pool, fn, calls)


def _run_pool(pool, fn, calls):
    futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=futures.get):
                yield futures[f], f.result()
    finally:
        for f in pending:
            f.cancel()


def _run_ray(ray, fn, calls):
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = {task.remote(*args): i for i, args in enumerate(calls)}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)
    finally:
        for ref in pending:
            ray.cancel(ref)
