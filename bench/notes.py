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

message-proxy against its peers on one machine, every peer a separate process. Every ratio comes
from {settings["runs"]} alternating round(s) of one invocation (the peer, then message-proxy right
after it, then the next round), each round's ratio printed beside the median. The machine is
shared and noisy: absolute rates move between invocations by a factor of two or more, ratios
less (see *Run-to-run variation* below). The CPU figure that does not move with the machine is
the count of instructions per message under callgrind (section 0).
{quick}
Reproduce (about 40 minutes; `--quick` is a smoke run that writes next to its logs):

```
{settings["command"].strip()}
```

Options: `--runs N`, `--messages N` (drains), `--backlog N` (memory), `--only stream,exchange,...`,
`--baseline REV` and `--instructions-messages N` (section 0), `--out DIR`. Raw per-run figures,
configs and every process's log go to a temporary directory named at the start of the run.
`uv run python -m bench instructions [--commit REV ...]` counts instructions alone, for any
commits (section 0's method).
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
  include other clients' work when the machine is busy; the peer's column is its own. In
  brackets after RabbitMQ's figure: the part spent on the Erlang VM's dirty CPU schedulers (the
  garbage collection of large heaps, such as a queue holding a backlog), read per thread from
  `/proc`. **RabbitMQ cores busy**: its CPU seconds over the drain's seconds, to set against the
  machine's two (it includes the schedulers' busy-waiting, so it reads high, never low).
  **Peak RSS**: psutil, every 50 ms, over the process's whole life.
- **Same conditions**: prefetch 1,000 for every consumer (message-proxy's default; the Shovel's
  `src-prefetch-count`), uvloop for every Python peer (message-proxy uses it when installed),
  hiredis installed for every Redis client.
- **Alternating rounds**: every comparison is message-proxy against one peer, in `--runs`
  rounds (5 by default). In each round every peer drains once, in an order that rotates from
  round to round, and message-proxy drains right after each of them: peer, message-proxy, peer,
  message-proxy, ... A round's ratio is message-proxy's rate over the rate of the peer it
  followed, two drains a few seconds apart, so a change in the machine's speed between rounds
  moves both sides of a ratio alike. The tables give every round's ratio and their median; the
  chart plots them. message-proxy's rate column is the median of all its drains.
- **Latency (4)**: the bench paces 2,000 msg/s (a tick every millisecond), puts `time.time_ns()`
  in the header `x-bench-sent-ns` of each message as it writes it, and does not wait for confirms
  between ticks. In the same event loop it reads the stream with `XREAD BLOCK` and takes, for
  each entry, the time it was read minus the time in its `headers` field. The first second is
  warm-up, left out of the percentiles (it is in the raw results). Default batch settings: up
  to 500 messages, no linger (natural batching).
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
- **aiormq ack-only ceiling** (`bench/peers/ack_only_aiormq.py`): the stricter ceiling, the
  fastest way a stock Python client consumes: aiormq's channel directly (no aio-pika on top),
  uvloop, a callback that only counts, `basic_ack(multiple=True, wait=False)` every 500
  deliveries and every 5 ms for the tail. It forwards nothing.
- **aio-pika ack-only ceiling** (`bench/peers/ack_only.py`): a plain aio-pika consumer that
  forwards nothing; `ack(multiple=True)` every 500 deliveries and every 5 ms for the tail.
- The client versions measured (aio-pika, aiormq, pamqp, redis-py, hiredis, uvloop, FastStream)
  are listed under *Machine* at the end.
- **RabbitMQ Shovel**: enabled with `rabbitmq-plugins enable rabbitmq_shovel`, a dynamic shovel
  set with `rabbitmqctl set_parameter shovel ...`: source the queue, destination the exchange
  through a network `amqp://` URI, `ack-mode` `on-confirm`, `src-prefetch-count` 1000.
"""


PROFILE = """## Profile: where the time per message goes

The CPU side is section 0 (instructions per message, stage by stage) and *Where the
instructions go* below. The wall-clock side, per role:

**Stream bridge.** It is not held by its own CPU: ~20 us of worker CPU per message in the
drains (section 1) against ~40 us of RabbitMQ's and ~4 of Redis's, on two cores shared with the
bench. A batch waits for one XADD pipeline per destination node (a loopback round trip plus
Redis's work), and what arrives meanwhile makes the next batch, so the drain rate follows the
broker's delivery rate. Past ~20,000 msg/s on this machine it is the two cores: RabbitMQ's
delivery, the worker and Redis together.

**Relay.** Its limit is neither its own CPU (~21 us per message, a fifth of a core at 9,000
msg/s) nor RabbitMQ's schedulers (1.16 cores busy of two, against 1.41 under the Shovel) but the
cycle of one batch: the worker encodes it, RabbitMQ takes the publishes through one channel into
one queue process and confirms them (35-50 ms for 500 persistent messages while the source queue
is being drained), the worker acks, and only then does the next batch go out. A bare publisher
(no consumer running) gets ~14,000 persistent msg/s through the same path whether it waits for
each batch of 500 to be confirmed or keeps 1,000 unconfirmed: the broker's path into one queue is
serial, so a second batch in flight did not shorten the drain when it was prototyped (one vs two
in flight, medians of 4: 6,389 vs 6,508 msg/s), nor did acking each confirmed part as its
confirms arrive (6,370 vs 6,231). The drain is level with the Shovel's (section 2: 0.98x, rounds
0.82-1.04), which a 5-round median on this machine cannot tell from 1.0.

**Latency (section 8).** Read each figure against the rig's floor measured in the same rounds:
the bench publishing at the rate and reading the source queue itself, nothing between. At 2,000
msg/s the floor's p99 is ~2.5 ms and its max reached 12.7 ms in one of five runs: the publisher,
RabbitMQ and the reader share two cores with everything else, so a max <= 10 ms target sits in
the rig's own tail. The stream bridge adds ~0.6 ms at p50 and ~0.7 ms at p99 (its rounds 2.05 to
4.48 ms, the target 3 met in two of five). At 8,000 msg/s the floor's own p99 is 4.2-6.6 ms, at
or above the 5 ms target before anything forwards; the bridge's is ~1.7 ms above it. The relay's
tail is the confirm wait: a message that arrives while a batch waits for its confirms goes out
only after them, where the Shovel publishes each message at once and keeps up to its prefetch
unconfirmed. That is its p99 above the Shovel's at 2,000 msg/s (4.5 vs 3.5 ms) and at 8,000 msg/s,
90 % of its drain rate, its queueing (p99 30 vs 19 ms). What would take it: writing the next
batch while the previous one waits for its confirms, settled in order; prototyped for throughput
(no gain, above) but not for latency, where it is the lever.

**What is left to take, if it is ever worth it:**

1. **Decode the relay's properties lazily**: the relay passes the delivered properties on byte
   for byte and a route on the routing key reads none of them but the hop count, yet *receive*
   decodes them all for every message (`_properties` and `decode_table`, ~47k instructions per
   message, ~30 % of the relay's count).
2. **Several batches in flight for the relay** (the latency lever above), or prefetch 2,000
   instead of 1,000 (8,048 vs 7,067 msg/s in two rounds of an earlier session; every peer here
   is compared at 1,000).
3. **More cores**: two cores top out near 20,000-25,000 msg/s for the bridge whatever the worker
   does (RabbitMQ's delivery is ~40 us per message of it). Past that, more workers (per-queue
   order is then per worker; see the README).
"""


VARIATION = """## Run-to-run variation

This machine is shared and its speed moves within an hour, not only between days. In the
invocation above, message-proxy's own drain into one stream ran at 15,948 to 25,153 msg/s across
its 20 runs of section 1 (the same code, the same backlog), and the Shovel at 8,311 to 10,446.
Only ratios from one invocation are compared, and even those spread: 0.82 to 1.04 for the relay
against the Shovel in the five rounds of section 2, 1.54 to 1.83 against the aiormq ceiling. An
earlier session's invocations gave the relay 0.75, 0.96 and 0.93 in one, 0.74, 0.81 and 1.04 an
hour earlier. Latency moves with the load the same way: the floor of section 8 (nothing
forwarding) has a p99 from 4.2 to 6.6 ms at 8,000 msg/s across the five rounds of one
invocation.
"""


INSTRUCTIONS = """## How instructions are counted (section 0)

`python -m bench instructions` (and the `instructions` workload of a full run) runs a worker as
users run it, `python -m workers.stream_bridge --config F` or `workers.exchange_relay`, under
`valgrind --tool=callgrind`, against the same RabbitMQ and Redis as the drains. Callgrind counts
the instructions the process executes; they do not depend on what else the machine runs, so the
same commit gives the same count to within about a percent however busy the machine is (the part
that does depend on time, heartbeats and the readiness pings, is small and counted apart: *loop
and other*). Each commit is measured in its own checkout (`--commit REV` makes a temporary git
worktree) with its own venv, on CPython 3.12 (the images' version), with `PYTHONHASHSEED=0`.

- **The window.** The worker starts with instrumentation off (start-up is not counted), then:
  instrumentation on, a warm-up drain (a fifth of the counted one), a dump (callgrind resets its
  counters at each dump), the worker frozen with SIGSTOP while the bench pre-fills the counted
  messages (5,000 by default), SIGCONT, and a second dump once every message is in the output and
  RabbitMQ reports none ready or unacked. The second dump is the drain and nothing else: receive,
  route, encode, write, settle of every message, in batches as a backlog drain makes them (the
  table gives their mean size).
- **Two passes.** The *plain* pass is the figure: the interpreter as it ships. The *stages* pass
  splits it. CPython 3.11 and 3.12 show callgrind only C: all Python code is one
  `_PyEval_EvalFrameDefault`. With `python -X perf` (3.12+), every Python function runs through
  a small stub of machine code of its own, whose address `/tmp/perf-<pid>.map` names. Callgrind
  sees each stub as a function without a symbol, named by its address, so the call graph has a
  node per Python function. With `--fn-skip` patterns matching every named C function (except
  the few a thread needs at its bottom), callgrind charges the C code (the interpreter's, the
  allocator, orjson, hiredis, uvloop) to the function that called it: a Python function's own
  count is then everything that ran while it was the innermost Python function on the stack.
  The stubs cost instructions of their own (every Python call then goes through C instead of
  the interpreter's inlined call), so the stages pass counts about 10 % more than the plain
  one; both totals are printed.
- **Stages.** `bench/stages.py` names, by file and qualified name, the functions where each stage
  begins: *receive* (the client's `data_received`, frame cutting and decoding, building the
  Message, the pipeline's `submit`), *route* (the route rules and the batch's plan), *encode*
  (entry fields, RESP; publish frames for the relay), *write* (the sink's round trip and its
  outcomes), *settle* (acks, per-batch metrics, the latency histogram), *batch* (the pipeline's
  loop and bookkeeping), *loop and other* (the event loop's own C code, timers, heartbeats, the
  watchers, the sidecar). A function no rule names (asyncio's, redis-py's, a dataclass
  `__init__`) is charged to its callers' stages in proportion to what each caller's calls to it
  cost. The mode lists the costly `proxy/` functions no rule names, so a rename does not pass
  unseen. On the relay, *receive* also holds the publisher connection's confirm frames: both
  connections run the same frame-cutting code, and a rule names code, not a connection.
- **What spoils a count.** Under valgrind a batch takes seconds, so the worker's readiness pings
  time out (counted in *loop and other*), and a RabbitMQ `consumer_timeout` of a few seconds
  (a test may set one for a while) closes the channel and redelivers: the bench then finds more
  entries than messages, prints `PROBLEM`, and the run is to be repeated.
"""


INSTRUCTION_PROFILE = """## Where the instructions go (at de47afe, the round's baseline)

From the stages pass of section 0 (CPython 3.12 with the perf trampoline, which adds ~10 %; a
backlog drain in batches of 500), the stream bridge's ~342,600 instructions per message
(311,600 plain): *encode* 35 %, *receive* 32 %, *write* 18 %, *route* 4.5 %, *settle* 4 %,
*garbage collection* 3.4 %, *batch* 2 %, the rest 1 %. The relay's ~214,500 (194,900 plain):
*receive* 52 %, *encode* 14 %, *write* 12 %, *route* 7 %, *settle* 6 %, *garbage collection* 6 %.
What would pay most, in instructions per message saved (estimates from the per-function counts):

1. **RESP in the Redis sink, ~80-90k (a quarter of the bridge).** Packing one XADD costs ~105k:
   `_bulk` (~70k: a call, a type test and a `%`-format per argument, ~20 arguments),
   `pack_commands`' generator (~19k), `_flat` (~10-15k). The head of an XADD (`*N`, `XADD`, the
   stream, `MAXLEN ~ n`, `*`) is the same for every entry of a target and the field names are
   constants: both can be encoded once, leaving per message only each value's `$len` prefix,
   collected into one list and joined once per batch.
2. **Reading the XADD replies, ~35-40k.** redis-py reads each of the 500 replies with
   `read_response` (~44k per message with what it calls): an `asyncio.timeout` entered, moved and
   left per reply (~25k), the parser's calls (~15k). Feeding the socket's bytes to a
   `hiredis.Reader` and taking the replies with `gets()` under one deadline for the batch would
   leave a few hundred instructions per reply.
3. **The content header, ~20k (both roles).** `_content_header` costs ~57k with what it calls:
   `decode_table` ~24k and `_short_str` ~22k (about seven calls per message, ~3k each: a call,
   a bounds test, a slice, a decode, a tuple), `_identity_properties` ~16k. Inlining the short
   strings of the common properties and the header keys, and for the relay decoding only what
   routing reads (it passes the raw properties on), would take most of it.
4. **Per-message objects and bookkeeping, ~15k.** Dataclass `__init__`s (Delivery, the client's
   delivery, Publish: ~7k), the frame loop that dispatches three frames per message (~14k own),
   the pipeline's per-message passes after the write (`_publish_all`'s outcome loop ~4k, the
   latency histogram's second `timestamp()` per message ~6k, the per-queue counters ~3k).
5. **Garbage collection, ~12k.** Every `(value, offset)` tuple of the decoder and every
   per-message dict is an allocation that brings the next collection closer; fewer of them
   (item 3) lowers it, and `gc.freeze()` after start-up would keep the collector from walking
   the start-up objects.

Items 1 and 2 alone come to about a third of the bridge's count.

**What was taken, and where the rest goes now.** Items 1 and 2 (RESP packed and read by hand),
3 (the content header read inline in one pass), 4 (per-batch bookkeeping, NamedTuples made without
their Python-level `__new__`) and 5 (`gc.freeze()` after start-up) are done: section 0's tables
give the counts after them. Of the stream bridge's ~163,000 plain, *receive* is now half
(~89,000: the properties ~25,000, the delivery's frames ~22,000, the header table ~22,000, for
messages with three headers), *encode* a fifth (~35,000, most of it one `%`-format per entry),
*write* ~15,000, *route* ~10,500, *settle* ~10,000, *batch* ~6,000, garbage collection ~5,000.
The relay's ~152,000 are the same receive (~89,000), *encode* ~23,000 and *write* ~16,000: its
next step is item 1 of the list above (properties it only passes on, not decoded).
"""
