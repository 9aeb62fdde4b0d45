"""The prose of ``docs/BENCHMARKS.md``: method, peers, and the profile summary."""

from __future__ import annotations

from typing import Any


def intro(settings: dict[str, Any]) -> str:
    quick = (
        "\n> **Quick smoke run** (`--quick`): one small run per figure, not representative.\n"
        if settings.get("quick")
        else ""
    )
    return f"""# Benchmarks

message-proxy against its peers on one machine, every peer a separate process, every figure the
median of {settings["runs"]} run(s) of one invocation, every ratio taken against a baseline
measured in that same invocation (the machine is shared and noisy: absolute figures move between
invocations by 30 % or more, ratios much less).
{quick}
Reproduce (about 20 minutes; `--quick` is a one-minute smoke run that writes next to its logs):

```
{settings["command"].strip()}
```

Options: `--runs N`, `--messages N` (drains), `--backlog N` (memory), `--only stream,exchange,...`,
`--out DIR`. Raw per-run figures, configs and every process's log go to a temporary directory
named at the start of the run.
"""


HOW_TIMED = """## How each figure was timed

- **Messages.** Persistent (delivery mode 2) JSON bodies of 226 bytes, `content_type`,
  `message_id`, `timestamp` and three headers, published with publisher confirms into a durable
  classic queue *before* the peer starts (`bench/publisher.py` writes pre-built frames, one lane,
  about 15,000 msg/s here; aiormq's own publish path manages about 6,000).
- **Drains (1, 2, 3, 5): from the broker's side, the same for every peer.** The bench polls the
  source queue every 5 ms with a passive `queue.declare` on its own connection. The clock starts
  at the first poll that sees fewer ready messages than were published (the peer took its first
  prefetch window) and stops at the first poll at which no message is ready *and* the output is
  complete: the stream holds every entry (`XLEN`), the destination queue bound to the exchange
  holds every message, or, for the ack-only consumer, which has no output, its ack counter in Redis
  (one `INCRBY` per multiple-ack) has reached the total. So process start-up, imports and
  connecting are outside the window for everyone, and the last ack (or the last entry) is inside.
  After the stop the bench checks that the source queue is empty (everything acked) and that the
  output holds exactly the number published; a run that fails either is reported below.
- **CPU per message**: user + system CPU of the peer process (psutil), and of RabbitMQ (`beam`)
  and `redis-server`, between the first delivery and the end of the drain, divided by the
  messages. **Peak RSS**: psutil, every 50 ms, over the process's whole life.
- **Same conditions**: prefetch 1,000 for every consumer (message-proxy's default; the Shovel's
  `src-prefetch-count`), uvloop for every Python peer (message-proxy uses it when installed),
  hiredis installed for every Redis client. Peers run in a rotating order within each round.
- **Latency (4)**: the bench paces 2,000 msg/s (a tick every millisecond), puts `time.time_ns()`
  in the header `x-bench-sent-ns` of each message as it writes it, and does not wait for confirms
  between ticks. In the same event loop it reads the stream with `XREAD BLOCK` and takes, for
  each entry, the time it was read minus the time in its `headers` field. The first second is
  warm-up, left out of the percentiles (it is in the raw results). Default batch settings: 500
  messages or 5 ms.
- **Memory (5)**: the worker's peak RSS while draining the backlog (pre-filled before it starts).
- **Start-up (6)**: from `Popen` to the first `/ready` 200, polled every 5 ms, five times per role.
"""


PEERS = """## The peers

- **message-proxy**: `python -m workers.stream_bridge --config F` (workload 1),
  `python -m workers.exchange_relay` (2), `python -m proxy run` (3, both kinds), default batch
  settings, one route `to = [{ stream = ..., maxlen = 10000000 }]` (MAXLEN `~`, as the style guide
  asks of every stream).
- **naive bridge** (`bench/peers/naive_bridge.py`): aio-pika `queue.iterator()`, for each message
  `async with message.process(): await redis.xadd(...)`: the shape of the usual tutorial.
- **FastStream bridge** (`bench/peers/faststream_bridge.py`): `FastStream(rabbit, redis)` with a
  `@rabbit.subscriber(RabbitQueue(...))` handler decorated with `@redis.publisher(stream=...)`
  that returns the decoded JSON body: the shape FastStream's documentation gives for moving
  messages between brokers (FastStream 0.7 API). FastStream acks after the handler returns, that
  is after the XADD: at-least-once, one message at a time.
- **ack-only ceiling** (`bench/peers/ack_only.py`): a plain aio-pika consumer that forwards
  nothing; `ack(multiple=True)` every 500 deliveries and every 5 ms for the tail.
- **RabbitMQ Shovel**: enabled with `rabbitmq-plugins enable rabbitmq_shovel`, a dynamic shovel
  set with `rabbitmqctl set_parameter shovel ...`: source the queue, destination the exchange
  through a network `amqp://` URI, `ack-mode` `on-confirm`, `src-prefetch-count` 1000.
"""


PROFILE = """## Profile: where the time per message goes

(To be filled in from a py-spy profile of a 100k drain.)
"""
