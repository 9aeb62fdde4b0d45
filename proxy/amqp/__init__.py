"""AMQP 0-9-1, in one place: the protocol layer message-proxy consumes and publishes with.

- ``frames``: pure encoding and decoding of frames, deliveries and field tables; no I/O.
- ``connection``: one connection as an ``asyncio.Protocol``: handshake, heartbeats, requests.
- ``consumer``: the source: connect, declare, consume, reconnect; deliveries go to the pipeline.
"""
