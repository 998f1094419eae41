"""The daemon's send path on real ZeroMQ sockets: a slow client loses nothing and never makes a
sender wait; a client that reads nothing is dropped past its allowance; a gone one is noticed."""

from __future__ import annotations

import asyncio
import tempfile

import pytest
import zmq
import zmq.asyncio

from mirador.runtime.server import Outbox, PeerGone

PAD = b"x" * 65536  # big enough that the kernel's socket buffers cannot hide the client's slowness


async def pair(ctx):
    """A ROUTER with tiny queues (so the client is "slow" at once) and a connected DEALER."""
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='mro-', dir='/tmp')}/s"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 10)
    router.bind(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 10)
    dealer.connect(endpoint)
    await dealer.send(b"hello")
    ident, _ = await router.recv_multipart()
    return router, dealer, ident


def test_slow_client_gets_every_reply_in_order_and_senders_never_wait():
    async def scenario():
        ctx = zmq.asyncio.Context()
        router, dealer, ident = await pair(ctx)
        outbox = Outbox(router, ident, max_bytes=100 << 20, stall_s=30)
        for i in range(500):  # returns at once each time: the replies wait in the outbox
            await asyncio.wait_for(outbox.send(b"%d:" % i + PAD), 0.5)
        assert outbox.queued_bytes > 100 * len(PAD)
        await asyncio.sleep(0.3)  # the client reads nothing for a while: nothing is lost
        received = [int((await asyncio.wait_for(dealer.recv(), 5)).split(b":")[0]) for _ in range(500)]
        assert received == list(range(500))
        assert outbox.queued_bytes == 0 and outbox.idle

        dealer.close(linger=0)
        await asyncio.sleep(0.2)
        with pytest.raises(PeerGone):
            for _ in range(100):  # ZeroMQ notices the disconnect within a few sends
                await outbox.send(b"anyone?")
                await asyncio.sleep(0.01)
        router.close(linger=0)
        ctx.term()

    asyncio.run(scenario())


def test_a_client_that_reads_nothing_is_dropped_past_its_byte_allowance():
    async def scenario():
        ctx = zmq.asyncio.Context()
        router, dealer, ident = await pair(ctx)
        drops = []
        outbox = Outbox(router, ident, max_bytes=20 * len(PAD), stall_s=30, on_drop=drops.append)
        with pytest.raises(PeerGone):
            for i in range(1000):
                await outbox.send(b"%d:" % i + PAD)
        assert outbox.queued_bytes == 0 and outbox.gone  # its replies are freed at once
        assert len(drops) == 1 and "client_buffer_mb" in drops[0]
        with pytest.raises(PeerGone):
            await outbox.send(b"more")
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()

    asyncio.run(scenario())


def test_a_client_that_reads_nothing_is_dropped_after_its_stall_allowance():
    async def scenario():
        ctx = zmq.asyncio.Context()
        router, dealer, ident = await pair(ctx)
        drops = []
        outbox = Outbox(router, ident, max_bytes=100 << 20, stall_s=0.5, on_drop=drops.append)
        for i in range(100):
            await outbox.send(b"%d:" % i + PAD)
        assert outbox.queued_bytes > 0 and not drops
        # Reading some is progress: the stall clock starts again.
        await asyncio.sleep(0.3)
        for _ in range(30):
            await asyncio.wait_for(dealer.recv(), 5)
        await asyncio.sleep(0.4)
        assert not drops and outbox.queued_bytes > 0
        for _ in range(40):  # then nothing more is read
            await asyncio.sleep(0.1)
            if drops:
                break
        assert len(drops) == 1 and "client_stall_s" in drops[0]
        assert outbox.queued_bytes == 0 and outbox.gone
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()

    asyncio.run(scenario())
