"""Which Python functions make up each stage of a message's way through a worker.

The first rule that matches a function names its stage; a function no rule names (a library's,
asyncio's, a dataclass ``__init__``) is charged to the stages of whoever called it, in proportion
(``bench.callgrind.by_stage``). So only the functions where a stage begins need a rule. When code
moves, add its new names here: the instructions mode lists the costly ``proxy/`` functions that
no rule names.
"""

from __future__ import annotations

from bench.callgrind import GARBAGE_COLLECTOR, Rule

RECEIVE, ROUTE, ENCODE, WRITE, SETTLE, BATCH, GC, OTHER = (
    "receive",
    "route",
    "encode",
    "write",
    "settle",
    "batch",
    "garbage collection",
    "loop and other",
)
STAGES = (RECEIVE, ROUTE, ENCODE, WRITE, SETTLE, BATCH, GC, OTHER)
DESCRIPTIONS = {
    RECEIVE: "socket bytes to a Delivery: cutting frames, decoding deliver, header and "
    "properties, building the Message, handing it to the pipeline (on the relay also the "
    "publisher connection's confirm frames, which the same connection code cuts)",
    ROUTE: "the route rules and the plan of a batch (which message goes where)",
    ENCODE: "a message to the destination's bytes: stream entry fields and RESP, or the "
    "AMQP publish frames",
    WRITE: "the sink's round trip: the write, reading the replies or confirms, their outcomes",
    SETTLE: "acks and rejects, the per-batch metrics and the latency histogram",
    BATCH: "the pipeline's own loop: waiting for a batch, slicing it, the flush bookkeeping",
    GC: "the interpreter's cyclic garbage collector, wherever an allocation set it off",
    OTHER: "the event loop's own C code, timers, heartbeats, the readiness watchers, the "
    "sidecar thread",
}

_SINK_REDIS = "proxy/sinks/redis_stream.py"
_SINK_AMQP = "proxy/sinks/amqp_exchange.py"
_RESP = "proxy/sinks/resp.py"  # packing is encode; reading replies falls to write below
_PIPELINE = "proxy/pipeline.py"

RULES: tuple[Rule, ...] = (
    # Work that runs beside the messages, whatever calls it.
    Rule(OTHER, "proxy/worker.py"),
    Rule(OTHER, "proxy/sidecar.py"),
    Rule(OTHER, "proxy/amqp/consumer.py", "AmqpSource._watch"),
    Rule(OTHER, "proxy/amqp/consumer.py", "AmqpSource.run"),
    Rule(OTHER, "proxy/amqp/connection.py", "AmqpConnection._beat"),
    Rule(OTHER, _SINK_REDIS, "RedisStreamSink.ping"),
    Rule(OTHER, _SINK_AMQP, "AmqpExchangeSink.ping"),
    Rule(OTHER, "proxy/amqp/publisher.py", "*.ping"),
    # The publisher's confirms arrive on a connection of the same class as the consumer's: its
    # notices are the write's, the frames around them are cut by the receive code (a few per
    # batch with multiple confirms).
    Rule(WRITE, "proxy/amqp/connection.py", "AmqpConnection._on_publisher_notice"),
    Rule(ENCODE, "proxy/amqp/publisher.py", "Publisher._method"),
    # The publishing half of the frame codec is the relay's encode, not its receive.
    Rule(ENCODE, "proxy/amqp/frames.py", "frame"),
    Rule(ENCODE, "proxy/amqp/frames.py", "publish_method"),
    Rule(ENCODE, "proxy/amqp/frames.py", "content_*"),
    Rule(ENCODE, "proxy/amqp/frames.py", "passed_on_header"),
    Rule(ENCODE, "proxy/amqp/frames.py", "_identity_encoded"),
    # receive
    Rule(RECEIVE, "proxy/amqp/frames.py"),
    Rule(RECEIVE, "proxy/amqp/connection.py", "AmqpConnection.data_received"),
    Rule(RECEIVE, "proxy/amqp/connection.py", "AmqpConnection._frames"),
    Rule(RECEIVE, "proxy/amqp/connection.py", "AmqpConnection._on_*"),
    Rule(RECEIVE, "proxy/amqp/connection.py", "AmqpConnection._deliver"),
    Rule(RECEIVE, "proxy/amqp/consumer.py", "*on_message"),
    Rule(RECEIVE, "proxy/message.py", "Message.of"),
    Rule(RECEIVE, _PIPELINE, "Pipeline.submit"),
    # route
    Rule(ROUTE, "proxy/routing.py"),
    Rule(ROUTE, "proxy/templates.py"),
    Rule(ROUTE, _PIPELINE, "Pipeline._plan"),
    Rule(ROUTE, _PIPELINE, "Pipeline._route"),
    # encode
    Rule(ENCODE, "proxy/encoding.py"),
    Rule(ENCODE, _SINK_REDIS, "_encode*"),
    Rule(ENCODE, _SINK_REDIS, "_flat"),
    Rule(ENCODE, _SINK_REDIS, "_bulk"),
    Rule(ENCODE, _SINK_REDIS, "pack_commands*"),
    Rule(ENCODE, _SINK_REDIS, "packed_xadds"),
    Rule(ENCODE, _SINK_REDIS, "xadd_arguments"),
    Rule(ENCODE, _SINK_REDIS, "_xadd_args"),
    Rule(ENCODE, _RESP, "bulk"),
    Rule(ENCODE, _RESP, "_array_prefix"),
    Rule(ENCODE, _RESP, "pack_commands*"),
    Rule(ENCODE, _RESP, "XaddHead.*"),
    Rule(ENCODE, _RESP, "packed_*"),
    Rule(ENCODE, _SINK_REDIS, "_pack_or_refuse"),
    Rule(ENCODE, _SINK_REDIS, "_too_large_entry"),
    Rule(ENCODE, _SINK_REDIS, "dedupe_*"),
    Rule(ENCODE, _SINK_AMQP, "encode"),
    Rule(ENCODE, _SINK_AMQP, "message_properties"),
    Rule(ENCODE, _SINK_AMQP, "*_header"),
    Rule(ENCODE, _SINK_AMQP, "field_table"),
    Rule(ENCODE, _SINK_AMQP, "_field_value"),
    Rule(ENCODE, _SINK_AMQP, "_shortstr"),
    Rule(ENCODE, _SINK_AMQP, "_longstr"),
    Rule(ENCODE, _SINK_AMQP, "_seconds"),
    Rule(ENCODE, _SINK_AMQP, "_identity_properties"),
    Rule(ENCODE, _SINK_AMQP, "publish_method"),
    Rule(ENCODE, _SINK_AMQP, "_frame"),
    Rule(ENCODE, _SINK_AMQP, "_ConfirmChannel._method"),
    Rule(ENCODE, _SINK_AMQP, "_ConfirmChannel._frames"),
    # write: the sinks' round trips, and the client libraries' readers that run on their own
    Rule(WRITE, "proxy/sinks/"),
    Rule(WRITE, "proxy/amqp/publisher.py"),
    Rule(WRITE, "aiormq/"),
    Rule(WRITE, "aio_pika/"),
    Rule(WRITE, _PIPELINE, "Pipeline._publish_*"),
    # settle
    Rule(SETTLE, _PIPELINE, "Pipeline._settle*"),
    Rule(SETTLE, _PIPELINE, "Pipeline._observe_latency*"),
    Rule(SETTLE, _PIPELINE, "Pipeline._dead_letter_all"),
    Rule(SETTLE, _PIPELINE, "_count_queues*"),
    Rule(SETTLE, "proxy/amqp/connection.py", "AmqpConnection.ack"),
    Rule(SETTLE, "proxy/amqp/connection.py", "AmqpConnection.reject"),
    Rule(SETTLE, "proxy/metrics.py"),
    Rule(SETTLE, "prometheus_client/"),
    Rule(SETTLE, "proxy/state.py", "HealthState.flushed"),
    # batch
    Rule(BATCH, _PIPELINE, "Pipeline.*"),
)
NATIVE = {GARBAGE_COLLECTOR: GC}  # C functions kept in the call graph, by name
