"""What a config reload changes, and whether a running worker can apply it: pure, no I/O.

A reload either applies the new file whole or not at all, so the worker always runs exactly one
file's config. What each part of the worker reads once at start cannot change under it:

- ``[amqp]``, ``[amqp_out]``: the consuming connection and the exchange destinations' publisher
  are opened with them (URL, prefetch, heartbeat, timeouts, ``max_inflight_bytes``);
- ``[redis]``, ``[dedupe]``: the Redis client and its dedupe window are built at start;
- ``[health]``: the sidecar's socket is bound at start;
- ``pid_file``: written at start.

A file that changes any of these is refused, naming each key: applying the rest would run a
mixture that no file describes (new routes to an exchange on a new ``[amqp_out]`` would publish
to the old broker). Everything else applies between two batches: routes, ``[dead_letter]``,
``unrouted``, ``max_message_bytes``, ``[batch]``, ``log_level``, ``shutdown_timeout``, and the
sources (a source whose table changed is stopped and started again, as if removed and added).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from pydantic import BaseModel

from proxy.config import Config, Source

# Sections and keys read once at start, in the order they are reported.
RESTART_KEYS = ("amqp", "amqp_out", "redis", "health", "dedupe", "pid_file")
# Keys applied between two batches (sources are compared one by one, by queue).
LIVE_KEYS = (
    "routes",
    "dead_letter",
    "unrouted",
    "max_message_bytes",
    "batch",
    "log_level",
    "shutdown_timeout",
)
RESTART_PROBLEM = "changed, but it is read once at start: restart the worker to apply it"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What applying ``new`` over the running config takes; ``problems`` say why it cannot."""

    problems: tuple[tuple[str, str], ...]
    changed: tuple[str, ...]  # live keys that differ, "sources" included
    removed: tuple[str, ...]  # queues to stop consuming (a changed source is both)
    added: tuple[Source, ...]  # sources to start, in file order

    @property
    def unchanged(self) -> bool:
        return not self.problems and not self.changed


def restart_keys_changed(old: Config, new: Config) -> list[str]:
    """Every key read once at start whose value differs, as a dotted path."""
    changed: list[str] = []
    for name in RESTART_KEYS:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if isinstance(before, BaseModel) and isinstance(after, BaseModel):
            changed += [
                f"{name}.{key}"
                for key in type(before).model_fields
                if getattr(before, key) != getattr(after, key)
            ]
        else:  # a table added or removed, or a plain key
            changed.append(name)
    return changed


def plan_reload(old: Config, new: Config, *, destination_kinds: Collection[str]) -> ReloadPlan:
    """Compare the running config with ``new``.

    ``destination_kinds`` are the kinds of destination the worker has a connection for
    (``stream``, ``exchange``): they were chosen at start from the first file.
    """
    problems = [(key, RESTART_PROBLEM) for key in restart_keys_changed(old, new)]
    problems += _missing_connections(new, destination_kinds)
    changed = [name for name in LIVE_KEYS if getattr(old, name) != getattr(new, name)]
    before = {source.queue: source for source in old.sources}
    after = {source.queue: source for source in new.sources}
    removed = tuple(queue for queue, source in before.items() if after.get(queue) != source)
    added = tuple(source for queue, source in after.items() if before.get(queue) != source)
    if removed or added or [s.queue for s in old.sources] != [s.queue for s in new.sources]:
        changed.append("sources")
    return ReloadPlan(tuple(problems), tuple(changed), removed, added)


def _missing_connections(new: Config, kinds: Collection[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if new.needs_redis() and "stream" not in kinds:
        problems.append(
            (
                new.first_stream_key(),
                "needs Redis, which this worker did not connect to at start (its config had no "
                "stream destination and no stream-queue source): restart the worker",
            )
        )
    if new.uses_exchanges() and "exchange" not in kinds:
        problems.append(
            (
                new.first_exchange_key(),
                "needs a publisher connection for exchange destinations, which this worker did "
                "not open at start (its config had none): restart the worker",
            )
        )
    return problems


def describe(plan: ReloadPlan) -> str:
    """The applied changes in one line: ``routes, sources (+q2, -q1)``."""
    parts: list[str] = []
    for name in plan.changed:
        if name != "sources":
            parts.append(name)
            continue
        started = {source.queue for source in plan.added}
        moves = [f"+{s.queue}" for s in plan.added if s.queue not in plan.removed]
        moves += [f"-{queue}" for queue in plan.removed if queue not in started]
        moves += [f"~{queue}" for queue in plan.removed if queue in started]
        parts.append(f"sources ({', '.join(moves)})" if moves else "sources (order)")
    return ", ".join(parts)
