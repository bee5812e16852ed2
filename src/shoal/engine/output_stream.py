"""One request's outputs on their way from the engine's thread to the caller's event loop.

The engine steps faster than a server can format and send a chunk per token when many requests
stream at once (a GPU step serves hundreds of rows in a few milliseconds). An output the caller
has not taken yet when the next one arrives is merged with it, as vLLM's output collector does:
the caller then takes every token since its last read in one output, and never falls behind by
more than one. What the caller sees over the whole stream is the same.

Semantics of `merge(old, new)` (RequestOutputs of one request, `old` the earlier):
    for each completion c of new (by index): c.text_delta = old's text_delta + c.text_delta,
        likewise token_ids_delta and logprobs_delta (when either has them); everything else
        (the totals, finish_reason, stop_reason, counts) is new's
    a completion only old has (none when the engine reports every sample each step) is kept
    the result is new, changed in place (its completions are this stream's own)
"""

from __future__ import annotations

import asyncio

from .outputs import RequestOutput


def merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` with `old`'s deltas in front of its own (see the module's Semantics)."""
    earlier = {c.index: c for c in old.outputs}
    for c in new.outputs:
        e = earlier.pop(c.index, None)
        if e is None:
            continue
        c.text_delta = e.text_delta + c.text_delta
        c.token_ids_delta = e.token_ids_delta + c.token_ids_delta
        if e.logprobs_delta is not None or c.logprobs_delta is not None:
            c.logprobs_delta = (e.logprobs_delta or []) + (c.logprobs_delta or [])
    if earlier:  # (a completion new does not report: kept, in index order)
        new.outputs = sorted(new.outputs + list(earlier.values()), key=lambda c: c.index)
    return new


class OutputStream:
    """A request's pending output (merged while untaken) and the error that ended its engine
    step, if any; `put` on the caller's event loop, `get` from the caller's task."""

    __slots__ = ("loop", "_ready", "_out", "_error")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready = asyncio.Event()
        self._out: RequestOutput | None = None
        self._error: BaseException | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        elif self._out is None:
            self._out = item
        else:
            self._out = merge(self._out, item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        """The pending output (every token since the last get), else the error."""
        await self._ready.wait()
        out, self._out = self._out, None
        if out is not None:
            if self._error is None:
                self._ready.clear()
            return out
        self._ready.clear()
        return self._error
