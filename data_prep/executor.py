"""Running a conversion's tasks: inline, in local processes, or as Ray tasks on a cluster.

`run_tasks(fn, calls, ...)` yields `(i, fn(*calls[i]))` as tasks finish (any order; callers never
depend on it). With one worker and no Ray address it runs inline, in this process.

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
from contextlib import contextmanager
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
        # a private Ray for this command only; token auth stays at Ray's default
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()  # disconnects this driver; a cluster we connected to keeps running


def run_tasks(fn: Callable, calls: list[tuple], workers: int = 1, ray_address: str | None = None
              ) -> Iterator[tuple[int, Any]]:
    if not calls:
        return
    if ray_address:
        yield from _run_ray(fn, calls, ray_address, workers)
    elif workers <= 1 or len(calls) == 1:
        for i, args in enumerate(calls):
            yield i, fn(*args)
    else:
        yield from _run_pool(fn, calls, workers)


def _run_pool(fn, calls, workers):
    # spawn, not fork: the parent may hold threads (a Ray client, a test runner) that fork would copy
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(calls)), mp_context=ctx) as pool:
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


def _run_ray(fn, calls, address, workers):
    with ray_session(address, workers) as ray:
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
