"""Destination templates: ``orders:{headers.tenant}`` expanded against a message.

Parsed once at config time (an unknown placeholder is a config error); expanded per message (a
missing value raises ``TemplateError``, which dead-letters that message with reason ``template``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import orjson

from proxy.errors import TemplateError
from proxy.message import Message, header_text, json_path

Getter = Callable[[Message], str]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
PLACEHOLDERS = (
    "{routing_key}, {routing_key.N}, {exchange}, {queue}, {message_id}, {headers.NAME}, {json.PATH}"
)


def _routing_word(index: int) -> Getter:
    def get(message: Message) -> str:
        words = message.routing_words
        if index >= len(words):
            raise TemplateError(f"routing key {message.routing_key!r} has no word {index}")
        return words[index]

    return get


def _message_id(message: Message) -> str:
    if message.message_id is None:
        raise TemplateError("message has no message_id")
    return message.message_id


def _header(name: str) -> Getter:
    def get(message: Message) -> str:
        if name not in message.headers:
            raise TemplateError(f"message has no header {name!r}")
        text = header_text(message.headers[name])
        if text is None:
            raise TemplateError(f"header {name!r} has no text value")
        return text

    return get


def _json(path: str) -> Getter:
    def get(message: Message) -> str:
        found, value = json_path(message.json, path)
        if not found or value is None:
            raise TemplateError(f"JSON body has no value at {path!r}")
        return value if isinstance(value, str) else orjson.dumps(value).decode()

    return get


def _getter(placeholder: str) -> Getter:
    name, _, rest = placeholder.partition(".")
    if name == "routing_key" and not rest:
        return lambda message: message.routing_key
    if name == "routing_key" and rest.isdigit():
        return _routing_word(int(rest))
    if name == "exchange" and not rest:
        return lambda message: message.exchange
    if name == "queue" and not rest:
        return lambda message: message.queue
    if name == "message_id" and not rest:
        return _message_id
    if name == "headers" and rest:
        return _header(rest)
    if name == "json" and rest and all(rest.split(".")):
        return _json(rest)
    raise ValueError(f"unknown placeholder {{{placeholder}}}; known: {PLACEHOLDERS}")


# Placeholders whose value depends only on where the message came from, not on its content.
ROUTING_PLACEHOLDERS = frozenset({"routing_key", "exchange", "queue"})


@dataclass(frozen=True, slots=True)
class Template:
    source: str
    parts: tuple[str | Getter, ...]
    placeholders: tuple[str, ...] = ()

    @staticmethod
    @lru_cache(maxsize=1024)
    def parse(source: str) -> Template:
        parts: list[str | Getter] = []
        placeholders: list[str] = []
        literal = ""
        position = 0
        for found in _PLACEHOLDER.finditer(source):
            literal += source[position : found.start()]
            position = found.end()
            token = found[0]
            if token in ("{{", "}}"):
                literal += token[0]
            elif token in ("{", "}"):
                raise ValueError(f"unbalanced {token!r} in template {source!r} (use {token * 2})")
            else:
                if literal:
                    parts.append(literal)
                    literal = ""
                parts.append(_getter(found[1].strip()))
                placeholders.append(found[1].strip())
        literal += source[position:]
        if literal:
            parts.append(literal)
        return Template(source, tuple(parts), tuple(placeholders))

    @property
    def is_constant(self) -> bool:
        return all(isinstance(part, str) for part in self.parts)

    @property
    def routing_only(self) -> bool:
        """True when the expansion depends on queue, exchange and routing key alone."""
        return all(p.partition(".")[0] in ROUTING_PLACEHOLDERS for p in self.placeholders)

    def expand(self, message: Message) -> str:
        return "".join(part if isinstance(part, str) else part(message) for part in self.parts)
