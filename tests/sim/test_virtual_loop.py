"""The simulator's event loop: virtual time, threads run in place, hangs named."""

from __future__ import annotations

import asyncio
import contextvars
import time

import pytest

from multicloud.core import clock
from multicloud.sim.loop import COMMAND, SimulationStuck, VirtualTimeLoop, run_virtual


def test_sleeping_costs_no_real_time_and_advances_the_clock() -> None:
    async def main() -> tuple[float, float]:
        before = clock.monotonic()
        await asyncio.sleep(3600)
        return before, clock.monotonic()

    started = time.perf_counter()
    before, after = run_virtual(main())
    assert after - before == 3600
    assert time.perf_counter() - started < 5


def test_timers_fire_in_time_order_and_timeouts_expire() -> None:
    async def main() -> tuple[list[int], bool]:
        order: list[int] = []

        async def later(seconds: int) -> None:
            await asyncio.sleep(seconds)
            order.append(seconds)

        await asyncio.gather(later(3), later(1), later(2))
        try:
            await asyncio.wait_for(asyncio.sleep(50), 10)
        except TimeoutError:
            return order, True
        return order, False

    assert run_virtual(main()) == ([1, 2, 3], True)


def test_executor_work_runs_here_and_its_outcome_comes_a_turn_later() -> None:
    async def main() -> tuple[int, str, list[str]]:
        seen: list[str] = []

        async def other() -> None:
            seen.append("other ran")

        task = asyncio.create_task(other())
        value = await asyncio.to_thread(lambda: 42)
        await task
        try:
            await asyncio.to_thread(int, "x")
        except ValueError as exc:
            return value, str(exc), seen
        return value, "", seen

    value, error, seen = run_virtual(main())
    assert value == 42
    assert "invalid literal" in error
    assert seen == ["other ran"]  # awaiting the executor yielded to the other task


def test_a_cancelled_wait_for_executor_work_is_left_alone() -> None:
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, lambda: 1)
        future.cancel()
        await asyncio.sleep(0)
        return future.cancelled()

    assert run_virtual(main())


def test_a_hang_is_named_instead_of_blocking_forever() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(SimulationStuck, match="hangs"):
        run_virtual(main())


def test_tasks_are_found_by_the_command_that_made_them() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        token = COMMAND.set("cmd-a")
        mine = [asyncio.create_task(asyncio.sleep(10)) for _ in range(3)]
        COMMAND.reset(token)
        theirs = asyncio.create_task(asyncio.sleep(10))
        found = len(loop.tasks_of("cmd-a"))
        for task in loop.tasks_of("cmd-a"):
            task.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        await theirs
        return found, len(loop.tasks_of("cmd-a"))

    assert run_virtual(main()) == (3, 0)


def test_a_task_made_with_its_own_context_carries_that_command() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        context = contextvars.copy_context()
        context.run(COMMAND.set, "cmd-b")
        task = loop.create_task(asyncio.sleep(1), context=context)
        count = len(loop.tasks_of("cmd-b"))
        await task
        return count

    assert run_virtual(main()) == 1


def test_wall_clock_is_virtual_only_inside_the_simulation() -> None:
    async def main() -> float:
        await asyncio.sleep(10)
        return clock.wall()

    with clock.virtual_wall(1_000.0):
        assert run_virtual(main()) == 1_010.0
    assert abs(clock.wall() - time.time()) < 60


def test_outside_a_loop_the_clock_is_the_system_monotonic_clock() -> None:
    assert abs(clock.monotonic() - time.monotonic()) < 1
