"""OpenMP worker pools: `kernels.release_omp_pool` ends the calling thread's workers, and an
`AsyncEngine` ends those of the thread that built it (with more pool workers than CPUs, libgomp's
barriers stop spinning and the engine's decode ran 0.70x as fast: docs/benchmarks.md)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from shoal import kernels
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine

pytestmark = pytest.mark.skipif(kernels.library() is None or (os.cpu_count() or 1) < 2,
                                reason="needs the kernels and 2 CPUs (a parallel region of 2 threads)")


def tasks() -> set[str]:
    """This process's thread ids."""
    return set(os.listdir("/proc/self/task"))


def on_new_thread(fn):
    """fn() on a fresh thread with 2 torch/OpenMP threads; its result."""
    out = {}

    def run():
        torch.set_num_threads(2)
        out["r"] = fn()

    before = torch.get_num_threads()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    torch.set_num_threads(before)
    return out["r"]


def test_release_ends_the_callers_workers_and_they_come_back_on_demand():
    x = torch.randn(64, 4096)

    def run():
        n0 = tasks()
        kernels.row_stats(x)  # a parallel region of 2: this thread's pool gets a worker
        workers = tasks() - n0
        released = kernels.release_omp_pool()
        left = workers & tasks()
        arg = kernels.row_stats(x)[0]  # the next region starts a worker again
        return len(workers), released, left, len(tasks() - n0), arg

    n_workers, released, left, n_again, arg = on_new_thread(run)
    assert (n_workers, released, left, n_again) == (1, True, set(), 1)
    assert torch.equal(arg, x.argmax(dim=-1))


def test_async_engine_ends_the_workers_of_the_thread_that_built_it(tiny_llama):
    x = torch.randn(64, 4096)

    def run():
        n0 = tasks()
        kernels.row_stats(x)  # this thread has a pool, as a server's main thread after loading
        workers = tasks() - n0
        eng = AsyncEngine(EngineConfig(model="tiny", block_size=8, num_kv_blocks=64), loaded=tiny_llama)
        left = workers & tasks()
        eng.shutdown()
        return workers, left

    workers, left = on_new_thread(run)
    assert len(workers) == 1 and left == set()  # its worker gone
