"""AMQP 0-9-1, in one place: the protocol layer message-proxy consumes and publishes with.

- ``frames``: pure encoding and decoding of frames, deliveries and field tables; no I/O.
- ``tables``: field tables both ways, faithful to every type RabbitMQ accepts; no I/O.
- ``flow``: the bodies held unacked against ``max_inflight_bytes``; pure bookkeeping.
- ``endpoint``: where and how to connect (URL, TLS) and the options of every broker socket.
- ``connection``: one connection as an ``asyncio.Protocol``: handshake, heartbeats, requests.
- ``consumer``: the source: connect, declare, consume, reconnect; deliveries go to the pipeline.
- ``publisher``: publishing with confirms, returns and ``connection.blocked``.
"""
