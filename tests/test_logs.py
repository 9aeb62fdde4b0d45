"""JSON log lines, level selection and password masking."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from proxy.errors import ConfigError
from proxy.logs import LEVEL_ENV, LOGGERS, configure_logging, redact

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _restore_loggers(monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    saved = {
        name: (list(log.handlers), log.level, log.propagate)
        for name in LOGGERS
        for log in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        log = logging.getLogger(name)
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_line_per_record(stream):
    configure_logging("INFO", stream=stream)
    log = logging.getLogger("proxy.worker")
    log.info("consumed %d from %s", 3, "events")
    log.warning("two\nlines")
    log.debug("below the level")
    first, second = records(stream)
    assert TS.match(first.pop("ts"))
    assert first == {"level": "INFO", "logger": "proxy.worker", "message": "consumed 3 from events"}
    assert second["message"] == "two\nlines"


def test_extra_fields_are_kept(stream):
    configure_logging(stream=stream)
    logging.getLogger("workers.stream_bridge").info(
        "flushed", extra={"queue": "events", "count": 3, "took": 0.5, "obj": object()}
    )
    (entry,) = records(stream)
    assert entry["logger"] == "workers.stream_bridge"
    assert (entry["queue"], entry["count"], entry["took"]) == ("events", 3, 0.5)
    assert entry["obj"].startswith("<object object")


def test_exception_text_is_included(stream):
    configure_logging(stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("proxy").exception("flush failed")
    (entry,) = records(stream)
    assert entry["message"] == "flush failed"
    assert entry["exc"].startswith("Traceback")
    assert "ValueError: boom" in entry["exc"]


def test_a_url_password_never_reaches_the_log(stream):
    configure_logging(stream=stream)
    url = "amqp://guest:s3cr3t@rabbit:5672/%2F"
    log = logging.getLogger("proxy.connections")
    log.warning("cannot connect to %s", url, extra={"url": "rediss://:s3cr3t@redis:6380/0"})
    try:
        raise ConnectionError(f"lost {url}")
    except ConnectionError:
        log.exception("connection lost")
    output = stream.getvalue()
    assert "s3cr3t" not in output
    first, second = records(stream)
    assert first["message"] == "cannot connect to amqp://guest:***@rabbit:5672/%2F"
    assert first["url"] == "rediss://:***@redis:6380/0"
    assert "lost amqp://guest:***@rabbit" in second["exc"]


def test_an_unserialisable_extra_does_not_lose_the_line(stream):
    configure_logging(stream=stream)
    logging.getLogger("proxy").info("big", extra={"n": 2**70})
    (entry,) = records(stream)
    assert (entry["message"], entry["n"]) == ("big", str(2**70))


def test_the_environment_overrides_the_level(stream, monkeypatch):
    monkeypatch.setenv(LEVEL_ENV, "debug")
    configure_logging("WARNING", stream=stream)
    logging.getLogger("proxy").debug("visible")
    assert [e["message"] for e in records(stream)] == ["visible"]
    assert logging.getLogger("workers").level == logging.DEBUG


def test_an_unknown_level_is_a_config_error_naming_the_source(monkeypatch):
    with pytest.raises(ConfigError) as raised:
        configure_logging("loud")
    assert raised.value.key == "level"
    monkeypatch.setenv(LEVEL_ENV, "loud")
    with pytest.raises(ConfigError) as raised:
        configure_logging("INFO")
    assert raised.value.key == LEVEL_ENV


@pytest.mark.parametrize("level", [logging.ERROR, "error", "40"])
def test_levels_as_names_or_numbers(stream, level):
    configure_logging(level, stream=stream)
    assert logging.getLogger("proxy").level == logging.ERROR


def test_configuring_twice_does_not_duplicate_lines(stream):
    configure_logging(stream=io.StringIO())
    configure_logging(stream=stream)
    logging.getLogger("proxy").info("once")
    assert len(records(stream)) == 1
    assert len(logging.getLogger("proxy").handlers) == 1


def test_the_default_stream_is_stdout(capsys):
    configure_logging()
    logging.getLogger("proxy").info("to stdout")
    assert json.loads(capsys.readouterr().out)["message"] == "to stdout"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("amqp://user:secret@host", "amqp://user:***@host", id="amqp"),
        pytest.param(
            "amqps://u:p@h:5671/%2F?heartbeat=30", "amqps://u:***@h:5671/%2F?heartbeat=30",
            id="amqps-with-port-vhost-query",
        ),
        pytest.param("redis://:secret@r:6379/0", "redis://:***@r:6379/0", id="no-user"),
        pytest.param("x+y://u:p@ss@h/x", "x+y://u:***@h/x", id="at-sign-in-password"),
        pytest.param(
            "from amqp://a:1@h1 to redis://b:2@h2.", "from amqp://a:***@h1 to redis://b:***@h2.",
            id="two-urls",
        ),
        pytest.param("'amqp://a:b@h'", "'amqp://a:***@h'", id="quoted"),
        pytest.param("redis://host:6379/0", "redis://host:6379/0", id="port-not-password"),
        pytest.param("amqp://user@host", "amqp://user@host", id="no-password"),
        pytest.param("mail me at a:b@c", "mail me at a:b@c", id="not-a-url"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected
