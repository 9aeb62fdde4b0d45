"""Config parsing: defaults, environment overrides, and errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    ExchangeDestination,
    StreamDestination,
    display_url,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError
from tests.helpers import run_cli

MINIMAL = """
[[sources]]
queue = "events"

[[routes]]
name = "all"
to = [ { stream = "events" } ]
"""


def parse(text: str, environ: dict[str, str] | None = None) -> Any:
    return parse_config(tomllib.loads(text), environ=environ or {})


def test_defaults_follow_the_contract() -> None:
    config = parse(MINIMAL)
    assert config.unrouted == "dead-letter"
    assert config.amqp.prefetch == 1000
    assert config.amqp.heartbeat == 10
    assert config.batch.max_messages == 500
    assert config.batch.max_delay_ms == 0  # natural batching; > 0 is a minimum linger
    assert config.health.port == 8000
    assert config.shutdown_timeout == 10
    assert config.sources[0].declare is True
    assert config.dead_letter is None
    assert config.dedupe.window == 86400


def test_full_contract_example_parses() -> None:
    text = (Path(__file__).parent / "data" / "contract.toml").read_text()
    config = parse(text)
    route = config.routes[0]
    assert route.match.routing_key == "order.*"
    assert route.match.json_fields == {"type": "order.created"}
    assert isinstance(route.to[0], StreamDestination) and route.to[0].maxlen == 100000
    assert isinstance(route.to[1], ExchangeDestination) and route.to[1].exchange == "audit"
    assert config.sources[0].bindings[0].routing_key == "order.#"
    assert config.dead_letter is not None and config.dead_letter.stream


def test_frozen() -> None:
    config = parse(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        config.amqp.prefetch = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("environ", "check"),
    [
        pytest.param(
            {"MESSAGE_PROXY_AMQP__URL": "amqp://u:p@rabbit:5673/v"},
            lambda c: c.amqp.url.get_secret_value() == "amqp://u:p@rabbit:5673/v",
            id="amqp-url",
        ),
        pytest.param(
            {"MESSAGE_PROXY_REDIS__URL": "redis://cache:6380/2"},
            lambda c: c.redis.url.get_secret_value() == "redis://cache:6380/2",
            id="redis-url",
        ),
        pytest.param(
            {"MESSAGE_PROXY_HEALTH__PORT": "9100"}, lambda c: c.health.port == 9100, id="int"
        ),
        pytest.param(
            {"MESSAGE_PROXY_BATCH__MAX_DELAY_MS": "2.5"},
            lambda c: c.batch.max_delay_ms == 2.5,
            id="float",
        ),
        pytest.param(
            {"MESSAGE_PROXY_UNROUTED": "drop"}, lambda c: c.unrouted == "drop", id="top-level"
        ),
        pytest.param(
            {"MESSAGE_PROXY_LOG_LEVEL": "debug"}, lambda c: c.log_level == "DEBUG", id="log-level"
        ),
        pytest.param(
            {"MESSAGE_PROXY_CONFIG": "/elsewhere.toml"},
            lambda c: True,
            id="config-path-is-not-a-key",
        ),
        pytest.param(
            {"OTHER_AMQP__URL": "nonsense"},
            lambda c: c.amqp.prefetch == 1000,
            id="other-prefixes-ignored",
        ),
    ],
)
def test_environment_overrides(environ: dict[str, str], check: Any) -> None:
    assert check(parse(MINIMAL, environ))


@pytest.mark.parametrize(
    ("text", "environ", "key", "problem"),
    [
        pytest.param(
            MINIMAL + "\n[amqp]\nprefetc = 5\n", {}, "amqp.prefetc", "unknown key", id="unknown-key"
        ),
        pytest.param("bogus = 1\n" + MINIMAL, {}, "bogus", "unknown key", id="unknown-top-key"),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "http://x"\n', {}, "amqp.url", "scheme", id="bad-url-scheme"
        ),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "amqp://h:notaport/"\n',
            {},
            "amqp.url",
            "not a valid URL",
            id="bad-url-port",
        ),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "amqp://h/?heartbeat=soon"\n',
            {},
            "amqp.url",
            "heartbeat in the URL",
            id="bad-url-heartbeat",
        ),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "amqps://h/?cafile=/no/such/ca.pem"\n',
            {},
            "amqp.url",
            "cafile in the URL is not a readable file",
            id="missing-tls-file",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_REDIS__URL": "nope"},
            "redis.url",
            "MESSAGE_PROXY_REDIS__URL",
            id="bad-url-from-env",
        ),
        pytest.param(
            MINIMAL + '[[routes]]\nname = "all"\nto = [{ stream = "x" }]\n',
            {},
            "routes[1].name",
            "duplicate route name",
            id="duplicate-route",
        ),
        pytest.param(
            MINIMAL.replace('"events" }', '"e:{header.x}" }'),
            {},
            "routes[0].to[0].stream",
            "unknown placeholder {header.x}",
            id="unknown-placeholder",
        ),
        pytest.param(
            MINIMAL.replace('"events" }', '"e:{nope" }'),
            {},
            "routes[0].to[0].stream",
            "unbalanced",
            id="unbalanced-brace",
        ),
        pytest.param(
            MINIMAL.replace('name = "all"', 'name = "all"\nmatch.plugin = "no.such:fn"'),
            {},
            "routes[0].match.plugin",
            "cannot import",
            id="unknown-plugin",
        ),
        pytest.param(
            MINIMAL.replace('name = "all"', 'name = "all"\nmatch.plugin = "tests.route_plugins:x"'),
            {},
            "routes[0].match.plugin",
            "no attribute",
            id="plugin-missing-attribute",
        ),
        pytest.param(
            MINIMAL.replace(
                'name = "all"', 'name = "all"\nmatch.plugin = "tests.route_plugins:NOT_CALLABLE"'
            ),
            {},
            "routes[0].match.plugin",
            "not callable",
            id="plugin-not-callable",
        ),
        pytest.param(
            MINIMAL.replace("{ stream", "{ streem"),
            {},
            "routes[0].to[0]",
            "'stream' or an 'exchange'",
            id="unknown-destination-kind",
        ),
        pytest.param(
            MINIMAL.replace("}", ", maxlen = 0 }"),
            {},
            "routes[0].to[0].maxlen",
            "greater than or equal to 1",
            id="maxlen-zero",
        ),
        pytest.param(
            "[[routes]]\nname='a'\nto=[{stream='s'}]",
            {},
            "sources",
            "required key is missing",
            id="no-sources",
        ),
        pytest.param(
            MINIMAL.replace('to = [ { stream = "events" } ]', "to = []"),
            {},
            "routes[0].to",
            "a route needs at least one destination",
            id="no-destinations",
        ),
        pytest.param(
            MINIMAL + "\n[dead_letter]\nrouting_key = 'x'\n",
            {},
            "dead_letter",
            "needs either a 'stream' or an 'exchange' key",
            id="dead-letter-without-target",
        ),
        pytest.param('unrouted = "keep"\n' + MINIMAL, {}, "unrouted", "dead-letter", id="unrouted"),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_HEALTH__PORT": "99999"},
            "health.port",
            "less than or equal",
            id="port-range-from-env",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_SOURCES__QUEUE": "x"},
            "sources",
            "not a table (an array can only be replaced whole, with MESSAGE_PROXY_SOURCES)",
            id="env-into-array",
        ),
        pytest.param(
            MINIMAL + "\n[dedupe]\nwindow = 'forever'\n",
            {},
            "dedupe.window",
            "duration",
            id="bad-duration",
        ),
        pytest.param(
            MINIMAL + "\n[amqp]\nheartbeat = 0\n",
            {},
            "amqp.heartbeat",
            "greater than or equal to 1",
            id="heartbeat-off",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_AMQP_OUT__HEARTBEAT": "0"},
            "amqp_out.heartbeat",
            "greater than or equal to 1 (set by MESSAGE_PROXY_AMQP_OUT__HEARTBEAT)",
            id="heartbeat-off-from-env",
        ),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "amqp://h/?heartbeat=0"\n',
            {},
            "amqp.url",
            "heartbeat in the URL must be a whole number of seconds, 1 to 600",
            id="heartbeat-off-in-the-url",
        ),
    ],
)
def test_errors_name_the_key(text: str, environ: dict[str, str], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    assert caught.value.key == key
    assert problem in str(caught.value)


def test_secrets_never_appear_in_errors_or_repr() -> None:
    secret = "s3cr3t-pa55"
    config = parse(MINIMAL + f'\n[amqp]\nurl = "amqp://user:{secret}@host/"\n')
    assert secret not in repr(config)
    assert secret not in str(config.amqp)
    assert display_url(config.amqp.url) == "amqp://user:***@host/"
    with pytest.raises(ConfigError) as caught:
        parse(MINIMAL + f'\n[amqp]\nurl = "amqpx://user:{secret}@host/"\n')
    assert secret not in str(caught.value)


def test_load_config_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[amqp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param(MINIMAL + "\n[amqp]\nprefetc = 5\n", "amqp.prefetc", id="unknown-key"),
        pytest.param(MINIMAL + '\n[amqp]\nurl = "amqp://h:port/"\n', "amqp.url", id="bad-url"),
        pytest.param(
            MINIMAL + '[[routes]]\nname = "all"\nto = [{ stream = "x" }]\n',
            "routes[1].name",
            id="duplicate-route",
        ),
        pytest.param(
            MINIMAL.replace('"events" }', '"{what}" }'),
            "routes[0].to[0].stream",
            id="unknown-placeholder",
        ),
        pytest.param(
            MINIMAL.replace('name = "all"', 'name = "all"\nmatch.plugin = "nope:x"'),
            "routes[0].match.plugin",
            id="unknown-plugin",
        ),
        pytest.param(MINIMAL + "\n[amqp]\nheartbeat = 0\n", "amqp.heartbeat", id="heartbeat-off"),
        pytest.param(
            MINIMAL + '\n[amqp]\nurl = "amqp://h/?heartbeat=0"\n',
            "amqp.url: heartbeat in the URL",
            id="heartbeat-off-in-the-url",
        ),
    ],
)
@pytest.mark.parametrize("command", [["check"], ["run"]])
def test_bad_config_exits_2_naming_the_key(
    tmp_path: Path, text: str, needle: str, command: list[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    result = run_cli([*command, "--config", str(path)])
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_path_exits_2() -> None:
    result = run_cli(["check"], env={"MESSAGE_PROXY_CONFIG": ""})
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    result = run_cli(["check"], env={"MESSAGE_PROXY_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "route all" in result.stdout


@pytest.mark.parametrize(
    ("amqp", "heartbeat"),
    [
        pytest.param('url = "amqp://u:p@h/v"', 10, id="default"),
        pytest.param('url = "amqp://u:p@h/v"\nheartbeat = 30', 30, id="key"),
        pytest.param('url = "amqp://u:p@h/v?heartbeat=3"\nheartbeat = 30', 3, id="url-wins"),
    ],
)
def test_amqp_heartbeat_is_short_by_default(amqp: str, heartbeat: int) -> None:
    from proxy.amqp.nodes import nodes_of

    config = parse(MINIMAL + f"\n[amqp]\n{amqp}\n")
    assert [node.endpoint.heartbeat for node in nodes_of(config.amqp)] == [heartbeat]


# --- [amqp] url: one node or a list of them ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key", "problem"),
    [
        pytest.param('"http://x"', "amqp.url", "scheme must be", id="one-bad-scheme"),
        pytest.param('["amqp://a", "http://b"]', "amqp.url[1]", "scheme must be", id="bad-scheme"),
        pytest.param('["amqp://a:5672", "amqp://b:port"]', "amqp.url[1]", "not a valid URL",
                     id="bad-port"),
        pytest.param('["amqp://a", "amqp:///v"]', "amqp.url[1]", "has no host", id="no-host"),
        pytest.param('["amqp://a/?heartbeat=0", "amqp://b"]', "amqp.url[0]", "heartbeat in the URL",
                     id="heartbeat-off"),
        pytest.param('["amqps://a/?cafile=/no/such.pem"]', "amqp.url[0]", "cafile in the URL",
                     id="missing-tls-file"),
        pytest.param("[]", "amqp.url", "needs at least one URL", id="empty"),
        pytest.param("5", "amqp.url", "a string, or an array of strings", id="not-a-string"),
        pytest.param('["amqp://a", 5]', "amqp.url[1]", "must be a string", id="item-not-a-string"),
        pytest.param('["amqp://a/prod", "amqp://b/test"]', "amqp.url", "the same vhost",
                     id="two-vhosts"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("section", ["amqp", "amqp_out"])
def test_each_amqp_url_is_checked_and_named_with_its_index(
    section: str, url: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(MINIMAL + f"\n[{section}]\nurl = {url}\n")
    assert caught.value.key == key.replace("amqp", section, 1)
    assert problem in caught.value.problem


def test_a_list_of_amqp_urls_keeps_its_order_and_masks_every_password() -> None:
    config = parse(
        MINIMAL + '\n[amqp]\nurl = ["amqp://u:pw-1@a:5672/%2F", "amqps://u:pw-2@b:5671/%2F"]\n'
    )
    assert [url.get_secret_value() for url in config.amqp.urls()] == [
        "amqp://u:pw-1@a:5672/%2F",
        "amqps://u:pw-2@b:5671/%2F",
    ]
    assert config.amqp.display() == "amqp://u:***@a:5672/%2F, amqps://u:***@b:5671/%2F"
    for shown in (repr(config), str(config.amqp), config.amqp.display()):
        assert "pw-1" not in shown and "pw-2" not in shown


def test_a_list_of_amqp_urls_from_the_environment() -> None:
    environ = {"MESSAGE_PROXY_AMQP__URL": '["amqp://u:pw@a:5672/%2F", "amqp://u:pw@b:5673/%2F"]'}
    config = parse(MINIMAL, environ)
    assert config.amqp.display() == "amqp://u:***@a:5672/%2F, amqp://u:***@b:5673/%2F"
    environ = {"MESSAGE_PROXY_AMQP__URL": '["amqp://u:pw@a/", "ftp://u:pw@b/"]'}
    with pytest.raises(ConfigError) as caught:
        parse(MINIMAL, environ)
    assert caught.value.key == "amqp.url[1]"
    assert "set by MESSAGE_PROXY_AMQP__URL" in caught.value.problem
    assert "pw" not in str(caught.value)


def test_check_lists_every_node_with_its_password_masked(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + '\n[amqp]\nurl = ["amqp://u:pw-1@a/", "amqp://u:pw-2@b/"]\n')
    result = run_cli(["check", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert "amqp: amqp://u:***@a/, amqp://u:***@b/ (prefetch 1000)" in result.stdout
    assert "pw-" not in result.stdout


# --- every problem, in words a person can act on ------------------------------------------------

TWO_ROUTES = MINIMAL + '[[routes]]\nname = "all"\nto = [{ stream = "x" }]\n'
MANY_PROBLEMS = "[[sources]]\nqueue = 'q'\n" + "".join(
    f"[[routes]]\nname = 'r{n}'\nto = [{{ stream = 's', maxlen = 0 }}]\n" for n in range(25)
)


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        pytest.param(
            MINIMAL.replace('queue = "events"', 'queu = "events"'),
            {},
            [
                ("sources[0].queue", "required key is missing"),
                ("sources[0].queu", "unknown key; did you mean 'queue'?"),
            ],
            id="typo-shows-the-cause",
        ),
        pytest.param(
            MINIMAL.replace('queue = "events"', 'queu = "events"').replace(
                'to = [ { stream = "events" } ]', "to = []"
            )
            + "\n[health]\nport = 'eight'\n",
            {},
            [
                ("health.port", "must be a whole number"),
                ("sources[0].queue", "required key is missing"),
                ("sources[0].queu", "unknown key; did you mean 'queue'?"),
                ("routes[0].to", "a route needs at least one destination"),
            ],
            id="all-of-them",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_AMPQ__URL": "amqp://h/"},
            [
                (
                    "ampq",
                    "unknown key (set by MESSAGE_PROXY_AMPQ__URL); "
                    "did you mean MESSAGE_PROXY_AMQP__URL?",
                )
            ],
            id="unknown-section-from-env",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_AMQP__PREFECH": "5"},
            [
                (
                    "amqp.prefech",
                    "unknown key (set by MESSAGE_PROXY_AMQP__PREFECH); "
                    "did you mean MESSAGE_PROXY_AMQP__PREFETCH?",
                )
            ],
            id="unknown-key-from-env",
        ),
        pytest.param(
            MINIMAL,
            {"MESSAGE_PROXY_HEALTH__PORT": "eighty"},
            [("health.port", "must be a whole number (set by MESSAGE_PROXY_HEALTH__PORT)")],
            id="bad-value-from-env",
        ),
        pytest.param(
            MINIMAL.replace('"events" }', '"events", maxlenn = 5 }'),
            {},
            [("routes[0].to[0].maxlenn", "unknown key; did you mean 'maxlen'?")],
            id="typo-in-a-destination",
        ),
        pytest.param(
            MINIMAL + "\n[amqp]\nprefetch = 0\n",
            {},
            [("amqp.prefetch", "must be greater than or equal to 1")],
            id="below-minimum",
        ),
        pytest.param(
            "unrouted = 'keep'\n" + MINIMAL,
            {},
            [("unrouted", "must be 'dead-letter' or 'drop'")],
            id="not-a-choice",
        ),
        pytest.param(
            MINIMAL.replace('queue = "events"', 'queue = "events"\ndeclare = "maybe"'),
            {},
            [("sources[0].declare", "must be true or false")],
            id="not-a-boolean",
        ),
        pytest.param(
            MINIMAL.replace('queue = "events"', 'queue = ""'),
            {},
            [("sources[0].queue", "must not be empty")],
            id="empty-string",
        ),
        pytest.param(
            "sources = []\n" + MINIMAL.replace("[[sources]]\nqueue = \"events\"\n", ""),
            {},
            [("sources", "at least one [[sources]] table is needed")],
            id="no-sources",
        ),
        pytest.param(
            MINIMAL + "\n[dead_letter]\nstream = 'dl'\nexchange = 'dlx'\n",
            {},
            [("dead_letter", "has both 'stream' and 'exchange'; keep one of them")],
            id="dead-letter-both-kinds",
        ),
        pytest.param(
            MINIMAL + "\n[dead_letter]\nexchange = 'dlx'\nmaxlen = 5\n",
            {},
            [("dead_letter", "'maxlen' trims a dead-letter stream; an exchange has none")],
            id="dead-letter-exchange-maxlen",
        ),
        pytest.param(
            MINIMAL + "\n[dead_letter]\nstream = 'dl'\nrouting_key = 'x'\n",
            {},
            [("dead_letter", "'routing_key' goes with a dead-letter exchange, not a stream")],
            id="dead-letter-stream-routing-key",
        ),
        pytest.param(
            TWO_ROUTES + '[[routes]]\nname = "all"\nto = [{ stream = "y" }]\n',
            {},
            [
                ("routes[1].name", "duplicate route name 'all' (also routes[0])"),
                ("routes[2].name", "duplicate route name 'all' (also routes[0])"),
            ],
            id="every-duplicate",
        ),
        pytest.param(
            MANY_PROBLEMS,
            {},
            [
                *(
                    (f"routes[{n}].to[0].maxlen", "must be greater than or equal to 1")
                    for n in range(20)
                ),
                ("", "... and 5 more problems"),
            ],
            id="at-most-20",
        ),
    ],
)
def test_every_problem_is_listed_with_its_key(
    text: str, environ: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    assert list(caught.value.problems) == expected
    assert caught.value.key == expected[0][0]


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        pytest.param(
            "stream-bridge",
            [
                (
                    "routes[1].to[0]",
                    "route 'audit' sends to an exchange, which the stream-bridge role cannot serve",
                ),
                (
                    "dead_letter.exchange",
                    "the stream-bridge role cannot dead-letter to an exchange",
                ),
            ],
            id="bridge",
        ),
        pytest.param(
            "exchange-relay",
            [
                (
                    "routes[0].to[0]",
                    "route 'all' sends to a stream, which the exchange-relay role cannot serve",
                ),
            ],
            id="relay",
        ),
    ],
)
def test_role_problems_read_as_english(role: str, expected: list[tuple[str, str]]) -> None:
    from proxy.worker import check_role

    config = parse(
        MINIMAL + "[[routes]]\nname = 'audit'\nto = [{ exchange = 'audit' }]\n"
        "[dead_letter]\nexchange = 'dlx'\n"
    )
    with pytest.raises(ConfigError) as caught:
        check_role(config, role)
    assert list(caught.value.problems) == expected


@pytest.mark.parametrize(
    ("redis", "key", "problem"),
    [
        pytest.param('url = ["redis://a", "redis://b"]', "redis.url", 'needs mode = "cluster"',
                     id="list-without-cluster"),
        pytest.param('mode = "cluster"\nurl = "redis://a/2"', "redis.url", "only database 0",
                     id="cluster-database"),
        pytest.param('mode = "cluster"\nurl = "unix:///r.sock"', "redis.url", "redis:// or rediss",
                     id="cluster-unix"),
        pytest.param('mode = "cluster"\nurl = ["redis://a", "http://b"]', "redis.url",
                     "scheme must be", id="cluster-bad-scheme"),
        pytest.param('mode = "cluster"\nurl = []', "redis.url", "at least one", id="cluster-empty"),
        pytest.param('mode = "sentinel"\nservice_name = "m"', "redis.sentinels", "at least one",
                     id="sentinel-without-sentinels"),
        pytest.param('mode = "sentinel"\nsentinels = ["redis://s:26379"]', "redis.service_name",
                     "service name", id="sentinel-without-service"),
        pytest.param('sentinels = ["redis://s:26379"]', "redis.sentinels", 'mode = "sentinel"',
                     id="sentinels-without-mode"),
        pytest.param('mode = "sentinel"\nservice_name = "m"\nsentinels = ["http://s"]',
                     "redis.sentinels", "scheme must be", id="sentinel-bad-scheme"),
        pytest.param('tls_server_name = "r"', "redis.tls_server_name", "no Redis URL is rediss",
                     id="tls-without-rediss"),
        pytest.param('url = "rediss://r"\ntls_ca_file = "/no/such/ca.pem"', "redis.tls_ca_file",
                     "not a readable file", id="tls-missing-file"),
        pytest.param('url = "rediss://r"\ntls_key_file = "/etc/hostname"', "redis.tls_key_file",
                     "needs tls_cert_file", id="tls-key-without-cert"),
        pytest.param("min_replicas = -1", "redis.min_replicas", "greater than or equal",
                     id="negative-replicas"),
        pytest.param('mode = "replicated"', "redis.mode", "standalone", id="unknown-mode"),
    ],
)  # fmt: skip
def test_redis_mode_keys_that_do_not_fit_name_the_key(redis: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(f"{MINIMAL}\n[redis]\n{redis}\n"), {})
    assert caught.value.key == key
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("redis", "replicas", "urls"),
    [
        pytest.param("", 0, 1, id="standalone"),
        pytest.param('mode = "cluster"\nurl = "redis://a:7000"', 1, 1, id="cluster-one-seed"),
        pytest.param('mode = "cluster"\nurl = ["redis://a:7000", "rediss://b:7001"]', 1, 2,
                     id="cluster-seeds"),
        pytest.param('mode = "sentinel"\nsentinels = ["redis://s:26379"]\nservice_name = "m"', 1,
                     1, id="sentinel"),
        pytest.param('mode = "cluster"\nurl = "redis://a"\nmin_replicas = 0', 0, 1,
                     id="cluster-no-wait"),
        pytest.param("min_replicas = 2", 2, 1, id="standalone-wait"),
    ],
)  # fmt: skip
def test_redis_modes_and_their_replica_default(redis: str, replicas: int, urls: int) -> None:
    config = parse_config(tomllib.loads(f"{MINIMAL}\n[redis]\n{redis}\n"), {})
    assert config.redis.replicas_required() == replicas
    assert len(config.redis.urls()) == urls


def test_a_list_of_redis_urls_from_the_environment() -> None:
    environ = {
        "MESSAGE_PROXY_REDIS__MODE": "cluster",
        "MESSAGE_PROXY_REDIS__URL": '["redis://:pw@a:7000", "redis://:pw@b:7001"]',
    }
    config = parse_config(tomllib.loads(MINIMAL), environ)
    assert [u.get_secret_value() for u in config.redis.urls()] == [
        "redis://:pw@a:7000",
        "redis://:pw@b:7001",
    ]
    assert "pw" not in repr(config.redis)
