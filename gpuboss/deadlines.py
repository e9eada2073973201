"""Deadlines for awaited Redis replies, one timer per event loop.

An asyncio client has no socket timeout (redis_io.connect_async says why), so each reply the asyncio side
awaits is bounded by :func:`gpuboss.redis_io.reply_within`. ``asyncio.timeout`` would do it, but it schedules
and cancels a timer for every reply, ~6 us each (two replies per uncontended acquire() + release(): measured
16-24 us less per pair with this module). Here the in-flight replies of one event loop share one timer, armed
for the earliest deadline among them: a reply that arrives in time costs a set entry, and the timer fires about
once per deadline span while replies keep coming (each script reply's deadline is the same span ahead, so a
new one never moves it earlier; a BLPOP's is longer by its block time, and a script reply sent while only
BLPOPs wait moves the timer earlier).

When the timer finds a wait past its deadline, it cancels the waiting task, as ``asyncio.timeout`` does; the
wait then tells that cancel from one that came from outside (:meth:`Wait.timed_out`), which stays a cancel.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Deadlines", "Wait", "deadlines"]


@dataclass(slots=True, eq=False)
class Wait:
    """One task awaiting a reply until ``deadline`` (the event loop's clock)."""

    task: asyncio.Task[Any]
    deadline: float
    #: the task's pending cancel requests when the wait began (a cancel from outside adds one)
    cancelling: int
    expired: bool = False

    def timed_out(self) -> bool:
        """Whether the CancelledError the task got is this wait's own expiry (then taken back), not a cancel
        from outside. Call it once, from the task's ``except CancelledError``."""
        return self.expired and self.task.uncancel() <= self.cancelling


@dataclass(eq=False)
class Deadlines:
    """The waits of one event loop, behind one timer."""

    loop: asyncio.AbstractEventLoop
    waits: set[Wait] = field(default_factory=set)
    #: the armed timer, held weakly (a handle holds its loop, which must not outlive its last use)
    timer: weakref.ref[asyncio.TimerHandle] | None = None
    armed_at: float = math.inf

    def start(self, seconds: float) -> Wait:
        """A wait of the running task for at most ``seconds``; :meth:`end` it however the await ends."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a reply deadline needs a running task")
        wait = Wait(task, self.loop.time() + seconds, task.cancelling())
        self.waits.add(wait)
        if wait.deadline < self.armed_at:
            self._arm(wait.deadline)
        return wait

    def end(self, wait: Wait) -> None:
        """The await of ``wait`` is over (a reply, an error or a cancel). The timer stays armed: it finds
        nothing due when it fires, and is cheaper left than cancelled and armed again for the next reply."""
        self.waits.discard(wait)

    def _arm(self, at: float) -> None:
        armed = self.timer() if self.timer is not None else None
        if armed is not None:
            armed.cancel()
        self.timer, self.armed_at = weakref.ref(self.loop.call_at(at, self._fire)), at

    def _fire(self) -> None:
        self.timer, self.armed_at = None, math.inf
        now = self.loop.time()
        earliest = math.inf
        for wait in self.waits:
            if wait.expired:
                continue
            if wait.deadline <= now:
                wait.expired = True
                wait.task.cancel()
            elif wait.deadline < earliest:
                earliest = wait.deadline
        if earliest < math.inf:
            self._arm(earliest)


#: Each event loop's deadlines, for as long as the loop lives: they reach it through a weak proxy, so that
#: an entry never keeps its own key alive.
_of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()


def deadlines() -> Deadlines:
    """The running event loop's :class:`Deadlines`."""
    loop = asyncio.get_running_loop()
    try:
        found = _of_loop.get(loop)
        if found is None:
            found = _of_loop[loop] = Deadlines(weakref.proxy(loop))
    except TypeError:  # a loop that cannot be weakly referenced: a timer for each wait, as asyncio.timeout has
        found = Deadlines(loop)
    return found
