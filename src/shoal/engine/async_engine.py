"""AsyncEngine: the engine for servers. The step loop runs on its own thread, off the event loop.

Callers `async for out in engine.generate(...)` and get a RequestOutput whenever their request
made progress (every token since their last read: outputs not yet taken are merged,
`output_stream`); leaving the loop early (a client disconnect) aborts the request and frees its KV
blocks. Every change to the engine (add, abort, adapters) is a command the loop thread runs
between steps, so the engine itself stays single-threaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from .. import kernels
from ..config import EngineConfig
from ..model.loader import LoadedModel
from .llm_engine import LLMEngine
from .output_stream import OutputStream
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.engine = LLMEngine(config, loaded)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, OutputStream] = {}
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="shoal-engine", daemon=True)
        self._thread.start()
        # From here on the model's work runs on the loop thread: this thread's OpenMP workers (from
        # loading and building the engine) would only count against the CPUs, and with more
        # workers than CPUs the loop thread's parallel regions stop spinning at their barriers
        # (measured, 2 threads on 2 cores: decode 0.70x as fast, `bench/engine_thread.py`;
        # `kernels.release_omp_pool`; a GPU engine's model work is not on the CPU: it keeps its
        # pool, and never builds the CPU kernels)
        if self.engine.runner.device.type == "cpu":
            kernels.release_omp_pool()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- the loop thread --------------------------------------------------------------------

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except BaseException as e:  # returned to the caller, not raised here
                if not fut.cancelled():
                    fut.set_exception(e)
            else:
                if not fut.cancelled():  # the caller may have gone (a cancelled request)
                    fut.set_result(result)

    def _loop(self) -> None:
        # a new thread's OpenMP regions use every CPU until told otherwise (torch sets this thread's
        # count at its first parallel op, which may come after the kernels' first region)
        torch.set_num_threads(self._threads)
        while not self._stop:
            self._run_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # a bug in a step must not hang every client
                self.error = e
                for rid in list(self._streams):
                    self._deliver(rid, e)
                    self.engine.abort(rid)
                continue
            # one wake-up of each event loop a step for all its streams' outputs (a call each cost
            # the loop a self-pipe write and a wake-up per request per step)
            batches: dict[asyncio.AbstractEventLoop, list] = {}
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    batches.setdefault(target.loop, []).append((target, out))
            for loop, items in batches.items():
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            target.loop.call_soon_threadsafe(target.put, item)

    async def _call(self, fn: Callable):
        """Run `fn` on the loop thread between steps; its result or exception comes back here."""
        fut: cf.Future = cf.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    # ---- public API -------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None, adapter: str | None = None,
                       final_only: bool = False,
                       on_cancel: Callable[[int, int], None] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request; ValueError (naming the field) for bad input.
        `final_only`: only the finished output (no output built or delivered each step).

        Close the stream when leaving early (`async with contextlib.aclosing(...)`, or a server
        cancelling the task): that aborts the request at once, and `on_cancel(prompt tokens,
        tokens generated so far)` is called (a final-only caller has seen no output to count)."""
        rid = request_id or f"req-{next(self._ids)}"
        stream = OutputStream(asyncio.get_running_loop())
        self._streams[rid] = stream
        finished = False
        req = None  # the engine's Request, for its counts if cut short

        def add():
            self.engine.add_request(rid, prompt, params, adapter, final_only)
            return self.engine.requests[rid]

        try:
            req = await self._call(add)
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine step failed: {item}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:  # queued, not awaited: this also runs while being cancelled
                self._commands.put((lambda: self.engine.abort(rid), cf.Future()))
                self._wake.set()
                if on_cancel is not None and req is not None:
                    # read across threads: the counts are ints and list lengths, a step old at worst
                    on_cancel(*req.tokens())

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now."""
        return await self._call(lambda: self.engine.abort(request_id))

    async def add_adapter(self, name: str, path: str) -> None:
        if self.engine.lora is None:
            raise ValueError("enable_lora: adapters need EngineConfig(enable_lora=True)")
        await self._call(lambda: self.engine.lora.add_adapter(name, path))

    async def remove_adapter(self, name: str) -> None:
        if self.engine.lora is not None:
            await self._call(lambda: self.engine.lora.remove_adapter(name))

    async def stats(self) -> dict:
        """Running/waiting sequences and KV use, read between steps."""
        def read():
            s, bm = self.engine.scheduler, self.engine.block_manager
            lora = self.engine.lora
            return {"running": s.num_running, "waiting": s.num_waiting, "kv_usage": bm.usage,
                    "free_blocks": bm.num_free_blocks,
                    "draft_tokens": self.engine.drafted, "accepted_draft_tokens": self.engine.accepted,
                    "adapters": len(lora.list_adapters()) if lora is not None else 0}
        return await self._call(read)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


def _put_all(items: list[tuple[OutputStream, RequestOutput]]) -> None:
    """On the event loop: each output into its stream (merged with one not yet taken)."""
    for stream, out in items:
        stream.put(out)
