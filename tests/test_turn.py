"""A session's turn: one request at a time, handed on in arrival order, waited for on the event
loop with a bounded line, given up by a cancelled waiter, released after work still in flight."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from hub_server.errors import SessionBusy
from hub_server.sessions import Turn


def test_the_turn_goes_to_waiters_in_arrival_order_and_the_line_is_bounded():
    async def run() -> list[int]:
        turn, served = Turn(max_waiting=3), []
        await turn.take()

        async def request(index: int) -> None:
            await turn.take()
            served.append(index)
            await asyncio.sleep(0)
            turn.release()

        waiters = [asyncio.create_task(request(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(SessionBusy, match="3 requests already wait"):
            await turn.take()
        turn.release()
        await asyncio.gather(*waiters)
        assert not turn.busy
        return served

    assert asyncio.run(run()) == [0, 1, 2]


def test_a_cancelled_waiter_leaves_the_line_and_closing_waits_past_a_full_one():
    async def run() -> None:
        turn = Turn(max_waiting=1)
        await turn.take()
        gone = asyncio.create_task(turn.take())
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(turn.take())  # the line has room again
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(turn.take(bounded=False))  # the line is full: closing waits anyway
        await asyncio.sleep(0.01)
        turn.release()
        await waiting
        turn.release()
        await closing
        turn.release()
        assert not turn.busy

    asyncio.run(run())


def test_a_turn_released_after_work_in_flight_passes_on_when_that_work_ends():
    async def run() -> None:
        turn, work = Turn(), Future()
        await turn.take()
        turn.release_after(work)
        assert turn.busy  # the pass is still on the device
        threading.Timer(0.05, lambda: work.set_result(None)).start()  # the scheduler's thread ends it
        await asyncio.wait_for(turn.take(), timeout=5)
        turn.release()

    asyncio.run(run())


def test_the_hubs_own_threads_wait_for_the_turn_without_an_event_loop():
    turn, order = Turn(), []
    assert turn.try_take()

    def evict() -> None:
        with turn.held():
            order.append("evicted")

    evictor = threading.Thread(target=evict)
    evictor.start()
    order.append("request done")
    turn.release()
    evictor.join(5)
    assert order == ["request done", "evicted"] and not turn.busy
