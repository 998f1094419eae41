"""The daemon's send path on real ZeroMQ sockets: a slow client loses nothing, a gone one is noticed."""

from __future__ import annotations

import asyncio
import tempfile

import pytest
import zmq
import zmq.asyncio

from mirador.runtime.server import Outbox, PeerGone


def test_slow_client_gets_every_reply_in_order():
    async def scenario():
        ctx = zmq.asyncio.Context()
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='mro-', dir='/tmp')}/s"
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 10)  # tiny queues, so the client is "slow" at once
        router.bind(endpoint)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVHWM, 10)
        dealer.connect(endpoint)
        await dealer.send(b"hello")
        ident, _ = await router.recv_multipart()

        outbox = Outbox(router, ident)
        outbox.HIGH_WATER = 50
        # Big enough that the kernel's socket buffers cannot hide the client's slowness.
        pad = b"x" * 65536
        sending = asyncio.ensure_future(asyncio.gather(*[outbox.send(b"%d:" % i + pad) for i in range(500)]))
        await asyncio.sleep(0.3)  # the client reads nothing for a while
        assert not sending.done()  # senders wait instead of dropping
        received = [int((await asyncio.wait_for(dealer.recv(), 5)).split(b":")[0]) for _ in range(500)]
        await sending
        assert received == list(range(500))

        dealer.close(linger=0)
        await asyncio.sleep(0.2)
        with pytest.raises(PeerGone):
            for _ in range(100):  # ZeroMQ notices the disconnect within a few sends
                await outbox.send(b"anyone?")
                await asyncio.sleep(0.01)
        router.close(linger=0)
        ctx.term()

    asyncio.run(scenario())
