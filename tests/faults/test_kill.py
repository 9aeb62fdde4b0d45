"""Workers killed with SIGKILL mid-flow: redelivery must cost no message and, with dedupe, no
duplicate."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from statistics import mean

import pytest

from tests.faults.rig import Rig, message, message_ids
from tests.helpers import publish

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MESSAGES = 3000
KILLS = 10


@pytest.fixture(params=[True, False], ids=["dedupe", "no-dedupe"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    # Small batches and a slow Redis widen the gap between a write and its ack, where a kill
    # leaves a message written but not acked: the redelivery that dedupe must absorb.
    rig = Rig(tmp_path, dedupe=request.param, batch=10, prefetch=100)
    try:
        yield rig
    finally:
        await rig.close()


async def test_kill_9_at_random_points_ten_times_in_a_row(rig: Rig) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    ids = message_ids(MESSAGES)
    await rig.declare()
    await publish(map(message, ids), routing_key=rig.queue, confirm_every=500)
    rig.redis.latency(0.02)
    restarts: list[float] = []
    for round_ in range(KILLS):
        started = time.monotonic()
        worker = await rig.start_worker(f"round{round_}")
        restarts.append(time.monotonic() - started)
        await asyncio.sleep(rng.uniform(0.1, 0.8))
        worker.kill()
    interrupted = await rig.delivered()
    rig.redis.heal()
    await rig.start_worker("final")
    counts = await rig.wait_for_all(ids)
    result = rig.record(f"kill -9 x{KILLS}", ids, counts, mean(restarts))
    assert 0 < interrupted < MESSAGES, f"the kills must land mid-flow (seed {seed})"
    await rig.check(result)


async def test_three_replicas_one_killed_mid_flow(rig: Rig) -> None:
    ids = message_ids(MESSAGES)
    await rig.declare()
    workers = await asyncio.gather(*(rig.start_worker(f"replica{n}") for n in range(3)))
    rig.redis.latency(0.005)
    publisher = asyncio.create_task(rig.publish_paced(ids, 3.0))
    await asyncio.sleep(1.0)
    length_at_kill = await rig.delivered()
    workers[1].kill()
    recover_s = await rig.wait_recovered(length_at_kill)
    await publisher
    rig.redis.heal()
    counts = await rig.wait_for_all(ids)
    result = rig.record("3 replicas, 1 killed", ids, counts, recover_s)
    await rig.check(result)
