"""A broker cut or hung mid-flow: every message lands, and once only with dedupe."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.faults.rig import Rig, message_ids

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MESSAGES = 3000

Fault = tuple[Callable[[Rig], None], Callable[[Rig], None]]

FAULTS: dict[str, Fault] = {
    "redis cut": (lambda r: r.redis.cut(), lambda r: r.redis.heal()),
    "redis blackholed": (lambda r: r.redis.blackhole(), lambda r: r.redis.heal()),
    "rabbitmq cut": (lambda r: r.amqp.cut(), lambda r: r.amqp.heal()),
    "rabbitmq blackholed": (lambda r: r.amqp.blackhole(), lambda r: r.amqp.heal()),
    "both cut": (
        lambda r: (r.redis.cut(), r.amqp.cut()),
        lambda r: (r.redis.heal(), r.amqp.heal()),
    ),
}


@pytest.fixture(params=[True, False], ids=["dedupe", "no-dedupe"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path, dedupe=request.param)
    try:
        yield rig
    finally:
        await rig.close()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_broker_fault_mid_flow(rig: Rig, fault: str) -> None:
    inject, heal = FAULTS[fault]
    await rig.declare()
    await rig.start_worker()
    ids = message_ids(MESSAGES)
    counts, recover_s, unready = await rig.fault_mid_flow(
        ids, lambda: inject(rig), lambda: heal(rig)
    )
    result = rig.record(f"{fault} 3s", ids, counts, recover_s, unready)
    await rig.check(result)
