"""Servers the cluster, failover and TLS tests need, started on this machine by the tests.

Beside the machine's own RabbitMQ (5672) and Redis (6379), which these never touch:

- ``redis.RedisCluster``: 3 masters with 1 replica each, ``cluster-node-timeout`` 1 s;
- ``redis.RedisSentinelGroup``: one master, one replica, 3 sentinels;
- ``redis.RedisTls``: a Redis with only a TLS port that asks for a client certificate;
- ``rabbit.RabbitCluster``: 3 RabbitMQ nodes clustered with ``rabbitmqctl join_cluster``, the first
  one with an ``amqps`` listener as well;
- ``certs.Certificates``: a CA, a server certificate for ``localhost`` and a client certificate.

Several test sessions may run at the same time on one machine, so every port is chosen free at
start, node names are random and everything lives in one temporary folder per session. A reaper
process (``reaper.py``) kills the servers and removes that folder when the session that started them
dies, however it dies. The pytest fixtures are in ``fixtures.py``: session-scoped, started when the
first test that needs them runs (the RabbitMQ cluster boots in the background as soon as a selected
test needs it). By hand: ``uv run python -m tests.servers up redis-cluster`` (see ``__main__.py``).
"""
