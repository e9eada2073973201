"""The reply deadlines of one event loop behind one timer (gpuboss/deadlines.py, used by redis_io.reply_within):
each wait ends at its own deadline whatever the others' are, a wait that ended is never cancelled later, the
timer follows the earliest open deadline, and a cancel from outside stays a cancel. test_redis_down.py runs
reply_within against a frozen Redis."""

from __future__ import annotations

import asyncio
import gc
import math

import pytest
from gpuboss import redis_io
from gpuboss.deadlines import _of_loop, deadlines


async def test_a_short_deadline_after_a_long_one_times_out_alone() -> None:
    """A BLPOP's deadline (long) is open when a script reply's (short) starts: the timer moves earlier for the
    short one, which times out; the long one still gets its reply."""
    loop = asyncio.get_running_loop()
    slow_reply = loop.create_future()
    long_wait = asyncio.ensure_future(redis_io.reply_within(slow_reply, 5.0))
    await asyncio.sleep(0)
    clock = deadlines()
    assert clock.armed_at == pytest.approx(loop.time() + 5.0, abs=0.5)
    started = loop.time()
    with pytest.raises(redis_io.RedisTimeoutError, match=r"within 0\.05 s"):
        await redis_io.reply_within(loop.create_future(), 0.05)
    assert 0.04 <= loop.time() - started < 1.0
    assert not long_wait.done()
    assert clock.armed_at == pytest.approx(started + 5.0, abs=0.5)  # (re-armed for the long one)
    slow_reply.set_result("popped")
    assert await long_wait == "popped"
    assert not clock.waits


async def test_a_wait_that_ended_is_never_cancelled_when_its_deadline_passes() -> None:
    """The timer stays armed after a reply came in time; when it fires it finds nothing due, cancels no task
    and goes quiet (no timer while nothing waits)."""

    async def at_once() -> str:
        await asyncio.sleep(0)
        return "reply"

    assert await redis_io.reply_within(at_once(), 0.05) == "reply"
    clock = deadlines()
    assert clock.timer is not None and clock.timer() is not None
    await asyncio.sleep(0.15)  # past the deadline: the timer fired, and this task was not cancelled
    me = asyncio.current_task()
    assert me is not None and me.cancelling() == 0
    assert clock.timer is None and clock.armed_at == math.inf


async def test_many_waits_share_one_timer() -> None:
    """Replies that keep coming each add a wait, not a timer: the one timer stays where the first armed it."""
    clock = deadlines()

    async def reply(n: int) -> int:
        await asyncio.sleep(0)
        return n

    got = [await redis_io.reply_within(reply(n), 5.0) for n in range(50)]
    assert got == list(range(50))
    assert clock.timer is not None
    first = clock.timer()
    assert first is not None
    for n in range(50):
        await redis_io.reply_within(reply(n), 5.0)
    assert clock.timer() is first
    assert not clock.waits


async def test_a_cancel_from_outside_at_the_deadline_stays_a_cancel() -> None:
    """The caller is cancelled in the same turn as the deadline passes: the task sees a cancel, not a Redis
    timeout (the deadline takes back only its own cancel)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(redis_io.reply_within(loop.create_future(), 0.05))
    await asyncio.sleep(0)
    loop.call_at(deadlines().armed_at, task.cancel)  # (after the timer's own callback, same moment)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_each_event_loop_has_its_own_timer() -> None:
    """A boss bound to a second loop (a thread of its own, say) gets that loop's timer."""
    mine = deadlines()

    def other() -> object:
        async def get() -> object:
            return deadlines()

        return asyncio.run(get())

    theirs = await asyncio.to_thread(other)
    assert theirs is not mine
    assert mine.loop.time() == pytest.approx(asyncio.get_running_loop().time(), abs=0.5)


def test_a_closed_event_loop_leaves_nothing_behind() -> None:
    """The deadlines of a loop go with it: ``asyncio.run`` after ``asyncio.run`` keeps no loop alive."""

    async def one_reply() -> str:
        async def at_once() -> str:
            return "reply"

        return await redis_io.reply_within(at_once(), 5.0)

    gc.collect()
    before = len(_of_loop)
    for _ in range(5):
        assert asyncio.run(one_reply()) == "reply"
    gc.collect()
    gc.collect()  # (a second pass frees what a finalizer of the first kept alive)
    assert len(_of_loop) == before
