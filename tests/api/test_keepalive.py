"""The SSE keep-alive (`api.routes.inference.with_keepalive`): events pass through in order, a
`: ping` comment goes out whenever none came for `every` seconds (proxies and clients then keep
the connection; the official client ignores comment lines), and a client that goes away stops
the producer (its `aclose` runs: the engine requests are aborted and billed there)."""

from __future__ import annotations

import asyncio

from shoal.api.routes.inference import with_keepalive


def test_events_pass_in_order_with_pings_in_the_gaps():
    async def source():
        yield "data: 1\n\n"
        await asyncio.sleep(0.25)  # a long first token: pings meanwhile
        yield "data: 2\n\n"
        yield "data: 3\n\n"

    async def main():
        return [e async for e in with_keepalive(source(), every=0.05)]

    got = asyncio.run(main())
    events = [e for e in got if not e.startswith(":")]
    pings = [e for e in got if e.startswith(":")]
    assert events == ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"]
    assert 2 <= len(pings) <= 6 and set(pings) == {": ping\n\n"}
    assert got.index("data: 1\n\n") < got.index(pings[0]) < got.index("data: 2\n\n")


def test_a_client_gone_closes_the_producer():
    closed = []

    async def source():
        try:
            yield "data: 1\n\n"
            await asyncio.sleep(10)  # (never reached by the client)
            yield "data: 2\n\n"
        finally:
            closed.append(True)

    async def main():
        stream = with_keepalive(source(), every=5)
        assert await stream.__anext__() == "data: 1\n\n"
        await stream.aclose()  # what the server does when the client disconnects

    asyncio.run(asyncio.wait_for(main(), 5))
    assert closed == [True]
