"""``message-proxy run | check | route | reload | replay | schema``: the command line.

Exit codes: 0 clean stop, 2 usage or config error, 1 fatal runtime error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.config import (
    Config,
    ExchangeDestination,
    StreamDestination,
    amqp_vhost,
    config_path,
    display_url,
    load_config,
)
from proxy.control import read_pid_file, remove_pid_file, send_reload, write_pid_file
from proxy.errors import ConfigError, ProxyError
from proxy.message import Message
from proxy.routing import Rejected, Router, StreamTarget, Target

if TYPE_CHECKING:  # imported at run time only by ``run``: ``check`` and ``route`` stay light
    from proxy.metrics import Metrics
    from proxy.sinks import Sink
    from proxy.state import HealthState

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # Ctrl-C before a worker runs, or during check, route or schema (128 + 2)

log = logging.getLogger("proxy.cli")


def _parser(prog: str, *, role_only: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="RabbitMQ to Redis Streams and AMQP.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    if role_only:
        parser.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
        return parser
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a worker with every destination kind")
    run.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
    check = commands.add_parser("check", help="validate the config and print the routes")
    check.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
    check.add_argument(
        "--brokers",
        action="store_true",
        help="connect and verify what the config relies on (queues, exchanges, Redis ACL)",
    )
    route = commands.add_parser("route", help="dry run: which routes a message would take")
    route.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
    route.add_argument("--routing-key", required=True)
    route.add_argument("--exchange", default="")
    route.add_argument("--queue", default=None, help="source queue (default: the first source)")
    route.add_argument("--header", action="append", default=[], metavar="K=V")
    route.add_argument("--content-type", default=None)
    route.add_argument("--message-id", default=None)
    route.add_argument("--body", default="", help="the body, or @FILE to read it from a file")
    route.add_argument("--json", action="store_true", help="print the result as JSON")
    reload = commands.add_parser(
        "reload", help="make a running worker read its config file again (SIGHUP)"
    )
    reload.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
    which = reload.add_mutually_exclusive_group()
    which.add_argument("--pid", type=int, help="the worker's process id")
    which.add_argument("--pid-file", help="the file the worker wrote its pid to")
    reload.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the worker's result, read from its sidecar (default 30)",
    )
    reload.add_argument(
        "--no-wait", action="store_true", help="send the signal and return at once"
    )
    replay = commands.add_parser(
        "replay", help="publish dead letters again, each removed once RabbitMQ confirmed it"
    )
    replay.add_argument("--config", help="config file (default: $MESSAGE_PROXY_CONFIG)")
    origin = replay.add_mutually_exclusive_group(required=True)
    origin.add_argument("--from", dest="stream", metavar="STREAM", help="a dead-letter stream")
    origin.add_argument("--from-queue", metavar="QUEUE", help="a dead-letter exchange's queue")
    replay.add_argument(
        "--to-exchange",
        metavar="EXCHANGE",
        help="publish there instead of the exchange each message first came to (a template)",
    )
    replay.add_argument(
        "--routing-key",
        metavar="KEY",
        help="the routing key to publish with (a template; default: the original, "
        "{routing_key})",
    )
    replay.add_argument("--reason", action="append", default=[], help="only this reason; repeat")
    replay.add_argument("--route", action="append", default=[], help="only this route; repeat")
    replay.add_argument("--since", metavar="TIME", help="dead-lettered at or after: RFC 3339 or 2h")
    replay.add_argument("--until", metavar="TIME", help="dead-lettered at or before")
    replay.add_argument("--limit", type=int, metavar="N", help="replay at most N")
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; send and remove nothing"
    )
    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.add_argument(
        "--markdown", action="store_true", help="print the config reference (docs/CONFIG.md)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser("message-proxy", role_only=False).parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": lambda a: _run(a, role="all"),
        "check": lambda a: check_brokers(_load(a)) if a.brokers else check(_load(a)),
        "route": lambda a: dry_run(_load(a), a),
        "reload": reload,
        "replay": replay,
        "schema": print_schema,
    }
    return _guarded(lambda: commands[args.command](args))


def role_main(role: str, argv: Sequence[str] | None = None) -> int:
    args = _parser(f"python -m workers.{role.replace('-', '_')}", role_only=True).parse_args(argv)
    return _guarded(lambda: _run(args, role=role))


def _run(args: argparse.Namespace, *, role: str) -> int:
    path = config_path(args.config)
    return run_worker(load_config(path), role=role, load=partial(load_config, path))


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _guarded(command: Callable[[], int]) -> int:
    """Expected conditions end with a message and an exit code, never a traceback."""
    try:
        code = command()
        sys.stdout.flush()  # inside the try: a reader that went away shows here
        return code
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"message-proxy: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # The reader stopped early (``| head``): what it read was right, the rest is unwanted.
        # Point stdout at /dev/null so the interpreter's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except KeyboardInterrupt:
        print("message-proxy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- run ---------------------------------------------------------------------------------------


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_worker(
    config: Config, *, role: str, load: Callable[[], Config] | None = None
) -> int:
    """Run a worker until it is stopped; ``load`` reads the config again on SIGHUP."""
    from proxy.logs import configure_logging
    from proxy.metrics import Metrics
    from proxy.sidecar import Sidecar
    from proxy.state import HealthState
    from proxy.worker import build_sinks

    configure_logging(config.log_level)
    sinks = build_sinks(config, role)  # role errors are config errors: exit 2 before anything runs
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry, role=role, version=__version__)
    health = HealthState()
    metrics.ready.follow(lambda: health.snapshot().is_ready())
    metrics.broker_node.follow(lambda: health.snapshot().nodes())
    sidecar = Sidecar(
        host=config.health.host, port=config.health.port, state=health, registry=registry
    )
    try:
        sidecar.start()
    except OSError as exc:
        log.error(
            "health sidecar cannot listen on %s:%d: %s", config.health.host, config.health.port, exc
        )
        return EXIT_FATAL
    log.info("message-proxy %s starting as %s", __version__, role)
    try:
        if config.pid_file is not None:
            try:
                write_pid_file(config.pid_file)
            except OSError as exc:
                log.error("cannot write the pid file %s: %s", config.pid_file, exc.strerror)
                return EXIT_FATAL
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(config, role, metrics, health, sinks, load))
    except Exception as exc:
        log.error("fatal: %s: %s", type(exc).__name__, exc)
        log.debug("fatal error", exc_info=True)
        return EXIT_FATAL
    finally:
        if config.pid_file is not None:
            remove_pid_file(config.pid_file)
        sidecar.stop()


async def _serve(
    config: Config,
    role: str,
    metrics: Metrics,
    health: HealthState,
    sinks: dict[type[Target], Sink],
    load: Callable[[], Config] | None,
) -> int:
    from proxy.worker import Worker, install_signal_handlers

    worker = Worker(config, role=role, metrics=metrics, health=health, sinks=sinks, load=load)
    # What start-up built stays for the process's life (modules, config, pydantic's validators):
    # frozen out of the collector's way, a collection walks only what deliveries allocate.
    gc.collect()
    gc.freeze()
    main_task = asyncio.create_task(worker.run(), name="worker")
    install_signal_handlers(worker, main_task)
    try:
        await main_task
    except asyncio.CancelledError:
        return EXIT_FATAL  # a second signal: stopped without draining
    log.info("stopped")
    return EXIT_OK


# --- check -------------------------------------------------------------------------------------


def _describe_destination(destination: Any) -> str:
    if isinstance(destination, StreamDestination):
        extra = f" maxlen~{destination.maxlen}" if destination.maxlen else ""
        return f"stream {destination.stream}{extra}{' dedupe' if destination.dedupe else ''}"
    return f"exchange {destination.exchange!r} routing_key {destination.routing_key}"


def check(config: Config) -> int:
    print(f"amqp: {config.amqp.display()} (prefetch {config.amqp.prefetch})")
    if config.amqp_out is not None:
        print(f"amqp_out: {config.amqp_out.display()}")
    if config.needs_redis():
        redis = config.redis
        nodes = redis.sentinels if redis.mode == "sentinel" else redis.urls()
        shown = ", ".join(display_url(url) for url in nodes)
        if redis.mode == "sentinel":
            shown = f"{redis.service_name} via {shown}"
        print(f"redis ({redis.mode}): {shown}")
    vhost = amqp_vhost(config.amqp)
    for source in config.sources:
        bindings = ", ".join(f"{b.exchange}/{b.routing_key}" for b in source.bindings) or "none"
        print(f"source {source.queue} (declare={source.declare}; bindings: {bindings})")
        if source.is_stream:
            start = source.stream_offset
            first = start.isoformat() if isinstance(start, datetime) else start
            print(
                f"  stream queue: offset kept in redis at {source.offset_key_in(vhost)}; "
                f"without one, starts at {first}"
            )
    for route in config.routes:
        matches = route.match.model_dump(exclude_defaults=True, by_alias=True)
        print(
            f"route {route.name}: match {matches or 'everything'}"
            f"{' (continue)' if route.continue_ else ''}"
        )
        for destination in route.to:
            print(f"  -> {_describe_destination(destination)}")
    if config.dead_letter is not None:
        print(f"dead letters -> {_describe_destination(config.dead_letter.destination())}")
    else:
        print("dead letters -> rejected without requeue (the queue's own DLX applies)")
    print(f"unrouted: {config.unrouted}")
    print("config OK")
    return EXIT_OK


# --- reload ---------------------------------------------------------------------------------


def reload(args: argparse.Namespace) -> int:
    """Validate the file here first: a file the worker would refuse is not sent at all."""
    config = None
    if args.config or os.environ.get("MESSAGE_PROXY_CONFIG") or args.pid is None:
        config = _load(args)
    if args.pid is not None:
        pid = args.pid
    elif args.pid_file is not None:
        pid = read_pid_file(args.pid_file)
    elif config is not None and config.pid_file is not None:
        pid = read_pid_file(config.pid_file)
    else:
        raise ConfigError(
            "--pid", "which worker? give --pid PID or --pid-file FILE, or set pid_file in the file"
        )
    return send_reload(pid, config, wait=None if args.no_wait else args.wait)


# --- replay ---------------------------------------------------------------------------------


def _replay_destination(args: argparse.Namespace) -> ExchangeDestination:
    from pydantic import ValidationError

    exchange = "{exchange}" if args.to_exchange is None else args.to_exchange
    routing_key = "{routing_key}" if args.routing_key is None else args.routing_key
    for key, fields in (
        ("--to-exchange", {"exchange": exchange}),
        ("--routing-key", {"exchange": "", "routing_key": routing_key}),
    ):
        try:
            ExchangeDestination.model_validate(fields)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(key, problem) from None
    return ExchangeDestination(exchange=exchange, routing_key=routing_key)


def replay(args: argparse.Namespace) -> int:
    from proxy.deadletters import make_filter
    from proxy.replay import ReplayStopped, Target, replay_stream
    from proxy.replay_queue import replay_queue

    config = _load(args)
    target = Target(_replay_destination(args))
    for key, value in (("--since", args.since), ("--until", args.until)):
        try:
            make_filter(since=value, now=0.0)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", "must be 1 or more")
    selection = make_filter(args.reason, args.route, args.since, args.until, now=time.time())
    if args.stream is not None:
        try:
            import redis  # noqa: F401 - not in the exchange relay's image
        except ImportError:
            raise ConfigError("--from", "a dead-letter stream needs the redis package") from None
        work = replay_stream(
            config,
            args.stream,
            target=target,
            selection=selection,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    else:
        work = replay_queue(
            config,
            args.from_queue,
            target=target,
            selection=selection,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    try:
        summary = asyncio.run(work)
    except ReplayStopped as exc:
        print(
            f"message-proxy: replay stopped: {exc}; what was confirmed is removed, the rest "
            "stays: run it again to go on",
            file=sys.stderr,
        )
        return EXIT_FATAL
    except (ProxyError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        print(f"message-proxy: replay failed: {detail}", file=sys.stderr)
        return EXIT_FATAL
    print(summary.line())
    return EXIT_FATAL if summary.failed else EXIT_OK


def check_brokers(config: Config) -> int:
    """One line per check; exit 1 at the first class of checks with a failure."""
    from proxy.brokercheck import check_brokers as run_checks

    return EXIT_OK if asyncio.run(run_checks(config, sys.stdout)) else EXIT_FATAL


# --- schema ------------------------------------------------------------------------------------


def print_schema(args: argparse.Namespace) -> int:
    from proxy.configdoc import markdown, schema_text

    sys.stdout.write(markdown() if args.markdown else schema_text())
    return EXIT_OK


# --- route (dry run) ---------------------------------------------------------------------------


def _target_json(target: Target) -> dict[str, Any]:
    if isinstance(target, StreamTarget):
        return {
            "route": target.route,
            "kind": "stream",
            "template": target.template,
            "stream": target.name,
            "maxlen": target.maxlen,
        }
    return {
        "route": target.route,
        "kind": "exchange",
        "template": target.template,
        "exchange": target.exchange,
        "routing_key": target.routing_key,
    }


def _read_body(value: str) -> bytes:
    if value.startswith("@"):
        if value == "@":
            raise ConfigError("--body", "@ needs a file name: --body @FILE")
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            raise ConfigError("--body", f"cannot read {value[1:]}: {exc.strerror}") from None
    return value.encode()


def dry_run(config: Config, args: argparse.Namespace) -> int:
    headers: dict[str | bytes, Any] = {}
    for pair in args.header:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ConfigError("--header", f"expected K=V, got {pair!r}")
        headers[name] = value
    message = Message(
        body=_read_body(args.body),
        routing_key=args.routing_key,
        exchange=args.exchange,
        queue=args.queue if args.queue is not None else config.sources[0].queue,
        headers=headers,
        content_type=args.content_type,
        message_id=args.message_id,
    )
    decision = Router.from_config(config).route(message)
    if isinstance(decision, Rejected):
        result: dict[str, Any] = {
            "decision": "dead-letter",
            "reason": decision.reason,
            "detail": decision.detail,
            "route": decision.route,
        }
        if decision.reason == "unrouted" and config.unrouted == "drop":
            result["decision"] = "drop"
    else:
        result = {
            "decision": "routed",
            "routes": list(dict.fromkeys(t.route for t in decision.targets)),
            "destinations": [_target_json(t) for t in decision.targets],
        }
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    elif result["decision"] == "routed":
        print(f"routes: {', '.join(result['routes'])}")
        for target in result["destinations"]:
            name = target.get("stream") or f"{target['exchange']!r} key {target['routing_key']!r}"
            print(f"  {target['route']} -> {target['kind']} {name}")
    else:
        print(f"{result['decision']}: {decision.reason}: {decision.detail}")  # type: ignore[union-attr]
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
