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


HUNG_S = 8.0


@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "no-dedupe"])
async def test_rabbitmq_hung_past_the_heartbeat_is_noticed(tmp_path: Path, dedupe: bool) -> None:
    """A short blackhole just stalls the flow; a hang past the heartbeat's grace (3 x (1 + 1) s
    here) must be noticed (readiness 503), the connection dropped and a new one made on heal."""
    rig = Rig(tmp_path, dedupe=dedupe, heartbeat=1)
    try:
        await rig.declare()
        await rig.start_worker()
        ids = message_ids(MESSAGES)
        counts, recover_s, unready = await rig.fault_mid_flow(
            ids, rig.amqp.blackhole, rig.amqp.heal, spread_s=4.0, fault_s=HUNG_S
        )
        result = rig.record(f"rabbitmq hung {HUNG_S:.0f}s", ids, counts, recover_s, unready)
        assert unready, rig.logs()
        await rig.check(result)
    finally:
        await rig.close()


@pytest.mark.parametrize("fault", ["cut", "blackholed"])
async def test_exchange_destination_fault_mid_flow(tmp_path: Path, fault: str) -> None:
    """The exchange sink: a lost connection or a confirm that never comes is transient."""
    rig = Rig(tmp_path, dedupe=False, exchange=True)
    inject = rig.amqp_out.cut if fault == "cut" else rig.amqp_out.blackhole
    try:
        await rig.declare()
        await rig.start_worker()
        ids = message_ids(MESSAGES)
        counts, recover_s, unready = await rig.fault_mid_flow(ids, inject, rig.amqp_out.heal)
        result = rig.record(f"exchange dest {fault} 3s", ids, counts, recover_s, unready)
        assert unready, rig.logs()
        await rig.check(result)
    finally:
        await rig.close()
