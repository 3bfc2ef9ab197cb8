"""`asgi.companion`: the body's own error comes out as itself, even while a scope around both is cancelled."""

from __future__ import annotations

import pytest
import trio

from common import asgi


async def test_a_body_error_during_a_cancellation_is_raised_as_itself_not_as_a_group():
    async def companion_task() -> None:
        await trio.sleep_forever()

    with trio.CancelScope() as outer:
        with pytest.raises(ValueError, match="the body's answer"):
            async with asgi.companion(companion_task):
                await trio.lowlevel.checkpoint()  # the companion is parked
                outer.cancel()  # e.g. the client left: the companion gets Cancelled...
                raise ValueError("the body's answer")  # ...while the body fails on its own
        await trio.lowlevel.checkpoint()  # and the cancellation still arrives at the next checkpoint
        pytest.fail("unreachable: the outer scope is cancelled")
    assert outer.cancelled_caught


async def test_a_failing_companion_cancels_the_body_and_its_error_comes_out():
    async def failing() -> None:
        raise KeyError("companion")

    with pytest.raises(KeyError, match="companion"):
        async with asgi.companion(failing):
            await trio.sleep(1)  # the companion fails first and the body is cancelled
            raise AssertionError("not reached")
