"""The config file (CONTRACT.md section 1), parsed once at the edge into frozen objects.

``load_config`` reads TOML, applies ``MESSAGE_PROXY_<SECTION>__<KEY>`` environment overrides,
validates with pydantic and turns every problem into one ``ConfigError`` that names the key.
Nothing below this module sees a dict or an environment variable.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.errors import ConfigError
from proxy.templates import Template

ENV_PREFIX = "MESSAGE_PROXY_"
# Environment variables with the prefix that are not config keys.
ENV_NOT_KEYS = frozenset({"MESSAGE_PROXY_CONFIG"})

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_HOPS = 8


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_url(value: SecretStr, schemes: tuple[str, ...]) -> SecretStr:
    raw = value.get_secret_value()
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be one of {', '.join(schemes)}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("port 0 is not a valid broker port")
    return value


def _check_amqp_query(value: SecretStr) -> None:
    """The query keys the AMQP connection reads: checked now, not on the first connect."""
    query = parse_qs(urlsplit(value.get_secret_value()).query)
    heartbeat = query.get("heartbeat", ["0"])[-1]
    if not heartbeat.isdigit() or int(heartbeat) > 600:
        raise ValueError("heartbeat in the URL must be a whole number of seconds, 0 to 600")
    for key in ("cafile", "certfile", "keyfile"):
        for path in query.get(key, []):
            if not Path(path).is_file():
                raise ValueError(f"{key} in the URL is not a readable file")


def display_url(url: SecretStr) -> str:
    """The URL with its password masked: safe for logs, errors and ``check`` output."""
    parts = urlsplit(url.get_secret_value())
    if parts.password is None:
        return parts.geturl()
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


class AmqpSettings(Frozen):
    url: SecretStr = SecretStr(DEFAULT_AMQP_URL)
    prefetch: int = Field(1000, ge=1, le=65535)
    connect_timeout: float = Field(10.0, gt=0)
    publish_timeout: float = Field(10.0, gt=0)
    # A broker that stops answering is only noticed through missed heartbeats (after about three
    # intervals); RabbitMQ's default of 60 s would leave a hung connection unnoticed for minutes.
    heartbeat: int = Field(10, ge=0, le=600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        _check_url(value, ("amqp", "amqps"))
        _check_amqp_query(value)
        return value

    def connection_url(self) -> str:
        """The URL to connect with: ``heartbeat`` added unless the URL sets its own."""
        raw = self.url.get_secret_value()
        parts = urlsplit(raw)
        if "heartbeat=" in parts.query:
            return raw
        query = f"{parts.query}&heartbeat={self.heartbeat}" if parts.query else (
            f"heartbeat={self.heartbeat}"
        )
        return parts._replace(query=query).geturl()


class RedisSettings(Frozen):
    url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    timeout: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        return _check_url(value, ("redis", "rediss", "unix"))


class HealthSettings(Frozen):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)


class BatchSettings(Frozen):
    max_messages: int = Field(500, ge=1, le=100_000)
    max_delay_ms: float = Field(5, ge=0, le=60_000)


class Binding(Frozen):
    exchange: str = Field(min_length=1)
    routing_key: str = "#"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"


class Source(Frozen):
    queue: str = Field(min_length=1)
    declare: bool = True
    arguments: dict[str, Any] = Field(default_factory=dict)
    bindings: tuple[Binding, ...] = ()
    single_active_consumer: bool = False

    def queue_arguments(self) -> dict[str, Any]:
        arguments = dict(self.arguments)
        if self.single_active_consumer:
            arguments["x-single-active-consumer"] = True
        return arguments


def _template(value: str, *, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise ValueError("must not be empty")
    Template.parse(value)  # raises ValueError naming the unknown placeholder
    return value


class StreamDestination(Frozen):
    stream: str
    maxlen: int | None = Field(None, ge=1)
    dedupe: bool = False

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        return _template(value)


class ExchangeDestination(Frozen):
    exchange: str
    routing_key: str = "{routing_key}"

    @field_validator("exchange")
    @classmethod
    def _exchange(cls, value: str) -> str:
        # "" is the default exchange: legal, it routes by queue name.
        return _template(value, allow_empty=True)

    @field_validator("routing_key")
    @classmethod
    def _routing_key(cls, value: str) -> str:
        return _template(value, allow_empty=True)


def _destination_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        if "stream" in value:
            return "stream"
        if "exchange" in value:
            return "exchange"
        return None
    if isinstance(value, StreamDestination):
        return "stream"
    if isinstance(value, ExchangeDestination):
        return "exchange"
    return None


Destination = Annotated[
    Annotated[StreamDestination, Tag("stream")] | Annotated[ExchangeDestination, Tag("exchange")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="a destination needs either a 'stream' or an 'exchange' key",
    ),
]


class Match(Frozen):
    routing_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    content_type: str | None = None
    json_fields: dict[str, Any] = Field(default_factory=dict, alias="json")
    queue: str | None = None
    plugin: str | None = None

    @field_validator("plugin")
    @classmethod
    def _plugin(cls, value: str | None) -> str | None:
        if value is not None:
            from proxy.plugins import load_plugin  # imports user code: only when configured

            load_plugin(value)
        return value


class Route(Frozen):
    name: str = Field(min_length=1)
    match: Match = Match()
    continue_: bool = Field(False, alias="continue")
    to: tuple[Destination, ...] = Field(min_length=1)


class DeadLetter(Frozen):
    stream: str | None = None
    maxlen: int | None = Field(None, ge=1)
    exchange: str | None = None
    routing_key: str = "{routing_key}"

    @model_validator(mode="after")
    def _one_kind(self) -> DeadLetter:
        if (self.stream is None) == (self.exchange is None):
            raise ValueError("set exactly one of 'stream' or 'exchange'")
        for value in (self.stream, self.exchange, self.routing_key):
            if value:
                _template(value)
        return self

    def destination(self) -> StreamDestination | ExchangeDestination:
        if self.stream is not None:
            return StreamDestination(stream=self.stream, maxlen=self.maxlen)
        return ExchangeDestination(exchange=self.exchange or "", routing_key=self.routing_key)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class DedupeSettings(Frozen):
    window: float = Field(86400.0, gt=0)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if isinstance(value, str):
            found = _DURATION.match(value)
            if found is None:
                raise ValueError("a duration like '24h', '30m', '90s' or a number of seconds")
            return float(found[1]) * _DURATION_UNITS[found[2]]
        return value


class Config(Frozen):
    unrouted: Literal["dead-letter", "drop"] = "dead-letter"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_timeout: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1)
    amqp: AmqpSettings = AmqpSettings()
    amqp_out: AmqpSettings | None = None
    redis: RedisSettings = RedisSettings()
    health: HealthSettings = HealthSettings()
    batch: BatchSettings = BatchSettings()
    dedupe: DedupeSettings = DedupeSettings()
    sources: tuple[Source, ...] = Field(min_length=1)
    routes: tuple[Route, ...] = Field(min_length=1)
    dead_letter: DeadLetter | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def stream_routes(self) -> list[str]:
        return [r.name for r in self.routes if any(isinstance(d, StreamDestination) for d in r.to)]

    def exchange_routes(self) -> list[str]:
        return [
            r.name for r in self.routes if any(isinstance(d, ExchangeDestination) for d in r.to)
        ]

    def uses_streams(self) -> bool:
        dead_letter_stream = self.dead_letter is not None and self.dead_letter.stream is not None
        return bool(self.stream_routes()) or dead_letter_stream

    def uses_exchanges(self) -> bool:
        dead_letter_exchange = (
            self.dead_letter is not None and self.dead_letter.exchange is not None
        )
        return bool(self.exchange_routes()) or dead_letter_exchange


# --- loading ---------------------------------------------------------------------------------


def _env_value(raw: str) -> Any:
    """A value that parses as TOML (8001, true, [..]) is that value; anything else is a string."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Returns the merged data and, for each overridden key path, the variable that set it."""
    merged = {
        key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()
    }
    origins: dict[tuple[str, ...], str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            raise ConfigError(name, "malformed override; use MESSAGE_PROXY_<SECTION>__<KEY>")
        table = merged
        for depth, part in enumerate(path[:-1]):
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                key = ".".join(path[: depth + 1])
                raise ConfigError(key, f"{name} cannot override inside a non-table key")
            table = child
        table[path[-1]] = _env_value(environ[name])
        origins[path] = name
    return merged, origins


def _key_path(loc: tuple[int | str, ...]) -> str:
    key = ""
    for position, part in enumerate(loc):
        after_destination_index = position >= 2 and loc[position - 2] in ("to",) and isinstance(
            loc[position - 1], int
        )
        if after_destination_index and part in ("stream", "exchange"):
            continue  # the discriminator tag, not a key the user wrote
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


def _first_error(exc: ValidationError, origins: Mapping[tuple[str, ...], str]) -> ConfigError:
    # Never echo the input: it may be a URL with a password in it.
    error = exc.errors(include_input=False, include_url=False)[0]
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    key = _key_path(loc) or "config"
    problem = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        problem = "unknown key"
    elif error["type"] == "missing":
        problem = "required key is missing"
    origin = origins.get(tuple(str(part) for part in loc))
    if origin:
        problem += f" (set by {origin})"
    # A failed item also fails its container ("at least 1 item"): count only the leaf problems.
    locs = [tuple(e["loc"]) for e in exc.errors(include_input=False)]
    leaves = [a for a in locs if not any(len(b) > len(a) and b[: len(a)] == a for b in locs)]
    more = len(leaves) - 1
    if more:
        problem += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(key, problem)


def _check_unique_route_names(config: Config) -> None:
    seen: dict[str, int] = {}
    for index, route in enumerate(config.routes):
        if route.name in seen:
            raise ConfigError(
                f"routes[{index}].name",
                f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])",
            )
        seen[route.name] = index


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    merged, origins = apply_env_overrides(dict(data), os.environ if environ is None else environ)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise _first_error(exc, origins) from None
    _check_unique_route_names(config)
    return config


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{file} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), f"not valid TOML: {exc}") from None
    return parse_config(data, environ)


def config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    path = cli_value or env.get("MESSAGE_PROXY_CONFIG")
    if not path:
        raise ConfigError(
            "--config", "no config file given (--config FILE or MESSAGE_PROXY_CONFIG)"
        )
    return path
