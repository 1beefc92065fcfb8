"""An event loop on virtual time that runs everything on one thread, in one order.

The simulator runs the product's own code (orchestrator, embedded nodes, chunk stores,
manifest) on this loop, and two things make a run exactly reproducible:

- **Virtual time.** `time()` is a counter. When no callback is ready the loop does not
  wait for its next timer: it jumps the clock there. A 45 ms cross-cloud latency, a
  60 s lease or a 120 s timeout costs no real time, and every duration the pipeline
  measures (through `multicloud.core.clock`) is the same on every run.
- **No threads.** `run_in_executor` (and so `asyncio.to_thread`) runs its function on
  the loop's thread, at once, and hands the result back one turn later, so the caller
  still yields as it would to a real thread. The order of events depends on nothing but
  the code and the seed.

The loop has no real I/O to wait for, so a moment with nothing ready and nothing
scheduled is a hang: `SimulationStuck` says so instead of blocking forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import weakref
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

from multicloud.core.errors import MulticloudError

__all__ = ["COMMAND", "SimulationStuck", "TaggingLoop", "VirtualTimeLoop", "run_on",
           "run_tagged", "run_virtual"]

# The command a task works for: tasks inherit it from the task that made them, so the
# simulator can find (and kill) every task of one orchestrator.
COMMAND: contextvars.ContextVar[str] = contextvars.ContextVar("multicloud_sim_command",
                                                              default="")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class SimulationStuck(MulticloudError):
    """Every task waits and nothing will wake one: the simulated system hangs."""


class _NoWaitSelector(selectors.DefaultSelector):
    """Polls instead of blocking, and moves the loop's clock over the wait it skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.skip: Callable[[float | None], None] = lambda timeout: None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout != 0:
            self.skip(timeout)
        return events


class TaggingLoop(asyncio.SelectorEventLoop):
    """A selector loop that knows which command (see COMMAND) each task works for, so a
    killed orchestrator's tasks can all be found. Real time; the soak runs on it."""

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        super().__init__(selector)
        self._tagged: dict[str, weakref.WeakSet[asyncio.Task[Any]]] = {}
        self.set_task_factory(self._make_task)

    @staticmethod
    def command_of(task: asyncio.Future[Any]) -> str:
        """The command a task was made for ("" for none)."""
        name = task.get_name() if isinstance(task, asyncio.Task) else ""
        return name.partition("/")[0] if "/" in name else ""

    def tasks_of(self, command: str) -> list[asyncio.Task[Any]]:
        """The unfinished tasks made on behalf of command (see COMMAND)."""
        return [task for task in self._tagged.get(command, ()) if not task.done()]

    def _make_task(self, loop: asyncio.AbstractEventLoop,
                   coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
                   context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        command = context.get(COMMAND, "") if context is not None else COMMAND.get()
        if command:
            self._tagged.setdefault(command, weakref.WeakSet()).add(task)
            task.set_name(f"{command}/{task.get_name()}")  # says whose, even when collected
        return task


class VirtualTimeLoop(TaggingLoop):
    """A tagging loop whose clock is virtual and whose executor is its own thread."""

    def __init__(self) -> None:
        selector = _NoWaitSelector()
        super().__init__(selector)
        selector.skip = self._skip
        self._now = 0.0

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._now

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        """Run func here and now; its outcome arrives on the next turn of the loop."""
        future: asyncio.Future[T] = self.create_future()
        try:
            result = func(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.call_soon(_settle, future, None, exc)
        else:
            self.call_soon(_settle, future, result, None)
        return future

    def _skip(self, timeout: float | None) -> None:
        if timeout is None:
            raise SimulationStuck("the simulated cluster hangs: every task waits and "
                                  "nothing is scheduled to wake one")
        self._now += timeout


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run main to its end on a fresh VirtualTimeLoop, then close the loop."""
    return run_on(VirtualTimeLoop(), main)


def run_tagged(main: Coroutine[Any, Any, T]) -> T:
    """Run main to its end on a fresh TaggingLoop (real time), then close the loop."""
    return run_on(TaggingLoop(), main)


def run_on(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, T]) -> T:
    """Run main to its end on loop; then cancel what is left and close the loop."""
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
