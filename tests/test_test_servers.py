"""The test servers themselves: they form, they can be failed on purpose, they clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import pytest

from tests.helpers import REPO, unique, wait_for
from tests.servers.rabbit_servers import RabbitCluster
from tests.servers.redis_servers import RedisCluster, RedisSentinelGroup

pytestmark = pytest.mark.broker


async def test_the_rabbitmq_cluster_runs_a_quorum_queue_on_its_3_nodes(
    rabbit_cluster: RabbitCluster,
) -> None:
    assert len(rabbit_cluster.running_nodes()) == 3
    queue = unique("cq")
    connection = await aio_pika.connect(rabbit_cluster.nodes[0].url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    status = json.loads(
        rabbit_cluster.nodes[1].ctl("list_queues", "name", "members", "--formatter", "json")
    )
    members = next(row["members"] for row in status if row["name"] == queue)
    assert sorted(members) == sorted(node.name for node in rabbit_cluster.nodes)
    # One node's app stopped: the queue still takes and gives messages through the others.
    rabbit_cluster.nodes[0].stop_app()
    try:
        connection = await aio_pika.connect(rabbit_cluster.nodes[2].url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue)
            got = await (await channel.get_queue(queue)).get(timeout=10)
            assert got.body == b"x"
            await got.ack()
            await channel.queue_delete(queue)
    finally:
        rabbit_cluster.nodes[0].start_app()


def test_the_redis_cluster_fails_over_a_killed_master(healthy_redis_cluster: RedisCluster) -> None:
    cluster = healthy_redis_cluster
    master = cluster.master_for_slot(0)
    replica = cluster.replica_of(master)
    master.kill()
    started = time.monotonic()
    wait_for(lambda: cluster.master_for_slot(0) is replica, 15, what="replica promoted")
    assert time.monotonic() - started < 10
    cluster.heal()
    assert len(cluster.masters()) == 3


def test_sentinels_agree_on_one_master(healthy_redis_sentinel: RedisSentinelGroup) -> None:
    master = healthy_redis_sentinel.current_master()
    assert master.client().info("replication")["role"] == "master"


def test_a_killed_session_leaves_no_server_and_no_folder(tmp_path: Path) -> None:
    """kill -9 of the process that started a server: the reaper ends it and removes its folder."""
    script = (
        "from tests.servers.base import Workspace\n"
        "from tests.servers.redis_servers import RedisNode\n"
        "from tests.servers.base import free_ports\n"
        "import time\n"
        "w = Workspace()\n"
        "node = RedisNode(w, 'one', free_ports(1)[0], []).start()\n"
        "print(w.root, node.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        folder, pid = child.stdout.readline().split()
        assert Path(folder).is_dir()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)

        def gone() -> bool:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return not Path(folder).exists()
            return False

        wait_for(gone, 10, what="server and folder removed")

