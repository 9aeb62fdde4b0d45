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
measured in that same invocation. The machine is shared and noisy: absolute figures move between
invocations by a factor of two or more, ratios less (see *Run-to-run variation* below).
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
  messages. The brokers are shared with whatever else runs on the machine, so their columns
  include other clients' work when the machine is busy; the peer's column is its own.
  **Peak RSS**: psutil, every 50 ms, over the process's whole life.
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

`py-spy record --format raw -r 250 --pid <worker>` over a 100,000-message drain by
`workers.stream_bridge` (uvloop, hiredis, default batch settings) on a quiet moment of this
machine: 9,700 msg/s, 90 us of worker CPU per message. Of the event loop's time:

- **~41 %, ~37 us: the Redis sink**, before this was changed: redis-py packed every argument of
  every XADD in Python (`pack_commands` alone was a third of the loop), then pipeline
  bookkeeping and a response callback per reply. The sink now writes a batch as one hand-packed
  RESP buffer on one pooled connection and reads the replies raw: measured in the same rounds as
  a patched peer first, 90 -> 74 us per message, 0.80x -> 0.95x the ack-only ceiling.
- **~34 %, ~31 us: receiving.** aiormq's frame reader, pamqp unmarshalling the three frames of
  each delivery (method; content header with its properties and header table; body), the
  hand-offs between aiormq's connection and channel readers, one Task per delivery for the
  consumer callback.
- **~10 %, ~9 us: the pipeline.** Routing, planning, settling, metrics (the per-message
  end-to-end latency histogram is a third of it).
- **~15 %, ~13 us: the event loop itself and socket writes.**

Per-delivery work of message-proxy's own (building the `Message`, routing it) is down to ~1.3 us
from ~5 us (~10 us on a busy machine; see the hot-path table below). The ack-only ceiling pays
the same receiving cost, plus aio-pika's `IncomingMessage` (~14 us per message), and nothing
else: ~70 us per message.
RabbitMQ spends ~40-45 us of CPU per persistent message delivered and acked, Redis ~4 us per XADD;
on 2 cores the three processes share, so every microsecond of the worker's is throughput.

**What it would take to go beyond the ack-only ceiling.** message-proxy forwards every message and
the ceiling does not, but the ceiling carries aio-pika's wrapper, which message-proxy skips (it
consumes on the raw aiormq channel). To pass it:

1. **Pack RESP by hand in the Redis sink**: done (see above).
2. **Receive without pamqp's general decoder and aiormq's Task per delivery**: a decoder for
   `basic.deliver` + content header that reads only the properties the contract names, and a
   consumer fed straight from the channel's frame reader instead of a Task and two asyncio queues
   per message. That is most of the 31 us; with (1) it would put message-proxy's CPU per message
   below the ack-only consumer's. It is a change of AMQP client internals (or of client), not of
   message-proxy's design.
3. **Count the latency histogram per batch** (bucket counts added once per flush instead of one
   locked `observe` per message): ~1 us.
4. **More cores, not more tricks**: at ~90 + ~43 + ~4 us per message across the worker, RabbitMQ
   and Redis, two cores top out near 14,000 msg/s whatever the worker does. Past that, more
   workers on more cores (the prefetch is per worker; per-queue order is then per worker).
"""


VARIATION = """## Run-to-run variation

The same command on the same code, run earlier while other test suites kept the machine busy (load
average 4-5 on 2 cores, the figures above were taken at 1-2), measured message-proxy at 3,375 msg/s
(runs 4,068, 2,146, 3,375), the ack-only ceiling at 3,773, the naive bridge at 1,193, FastStream at
823; ratios 0.59x the ceiling and 2.4x the naive bridge; the relay at 0.68x the Shovel; latency
p50 6.9 ms, p99 18 ms (one run 54 ms); peak RSS 65.5 MB. On a CPU-starved machine message-proxy
loses more than the lighter peers: its ~90 us of CPU per message, against the ceiling's ~70,
weighs more when a core is shared three or four ways. The ratios above are from a quiet moment;
expect them lower on a busy one.
"""
