"""Stream-queue offsets in Redis, recorded in the same script as the batch's entries.

One ``EVALSHA`` per batch reads the recorded offset of every source in it, writes each entry
whose delivery lies beyond its source's offset (an entry at or below it was written before:
by this batch's earlier attempt whose reply was lost, or by another worker reading the same
stream), then records the batch's last offsets, all in one atomic step. Whatever the connection
or the worker does in between, an entry is written once: exactly once without message ids.

When Redis refuses an entry (``WRONGTYPE``...), the script records nothing: that message still
has to be dead-lettered, and the offsets are recorded after its dead letter was written.

The key a source's offset is kept under holds the offset as a decimal integer: ``GET`` to read
it, ``DEL`` to start again from the source's ``stream_offset``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.encoding import Fields
from proxy.routing import StreamTarget
from proxy.stream_offsets import StreamPosition, parse_recorded

# KEYS: the offset keys, then each entry's stream and, with dedupe, its dedupe key.
# ARGV[1]: the dedupe window in ms; ARGV[2]: k, the number of offset keys; ARGV[3 .. 2 + k]: the
# offset to record under each, '' to record none. Then per entry: its stream's index in KEYS,
# maxlen ('' for none), its dedupe key's index (0: none), its offset key's index (0: none), its
# offset, n, then n field and value strings.
# Returns per entry the new entry id, 0 (a duplicate message id), -1 (at or below its source's
# recorded offset) or an error text; then 1 when the offsets were recorded, else 0.
RECORDING_SCRIPT = """
local k = tonumber(ARGV[2])
local recorded = {}
for j = 1, k do
  local value = redis.pcall('GET', KEYS[j])
  if type(value) == 'table' and value.err then
    return redis.error_reply('offset key ' .. KEYS[j] .. ': ' .. value.err)
  end
  recorded[j] = tonumber(value or '-1')
  if recorded[j] == nil then
    return redis.error_reply('offset key ' .. KEYS[j] .. ' does not hold an offset')
  end
end
local results, refused, i = {}, false, 3 + k
while i <= #ARGV do
  local stream, maxlen = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local dedupe, source = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local offset, n = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local first = i + 6
  i = first + n
  if source > 0 and offset <= recorded[source] then
    results[#results + 1] = -1
  else
    local fresh = true
    if dedupe > 0 then
      fresh = redis.pcall('SET', KEYS[dedupe], '1', 'NX', 'PX', ARGV[1])
    end
    if type(fresh) == 'table' and fresh.err then
      results[#results + 1] = fresh.err
      refused = true
    elseif not fresh then
      results[#results + 1] = 0
    else
      local args = {'XADD', stream}
      if maxlen ~= '' then
        args[3], args[4], args[5] = 'MAXLEN', '~', maxlen
      end
      args[#args + 1] = '*'
      for j = first, first + n - 1 do
        args[#args + 1] = ARGV[j]
      end
      local reply = redis.pcall(unpack(args))
      if type(reply) == 'table' and reply.err then
        if dedupe > 0 then
          redis.call('DEL', KEYS[dedupe])
        end
        results[#results + 1] = reply.err
        refused = true
      else
        results[#results + 1] = reply
      end
    end
  end
end
local done = 0
if not refused then
  done = 1
  for j = 1, k do
    local offset = ARGV[2 + j]
    if offset ~= '' and tonumber(offset) > recorded[j] then
      redis.call('SET', KEYS[j], offset)
    end
  end
end
results[#results + 1] = done
return results
"""

# The offsets alone, after every destination accepted: KEYS the offset keys, ARGV their offsets.
# Never moves one back (another worker on the same stream may be ahead).
RECORD_SCRIPT = """
for j = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[j]) or '-1')
  if current == nil or tonumber(ARGV[j]) > current then
    redis.call('SET', KEYS[j], ARGV[j])
  end
end
return #KEYS
"""

# One entry of a recording batch: (stream, fields, dedupe key or None, position or None).
Entry = tuple[StreamTarget, Fields, str | None, StreamPosition | None]

ALREADY_WRITTEN = -1


def recording_call(
    entries: Sequence[Entry], offsets: Mapping[str, int], window_ms: int, *, record: bool
) -> list[Any]:
    """The ``EVALSHA`` arguments (the script's text in place of its sha) for ``entries``;
    ``record`` False checks the entries against the recorded offsets but records none."""
    sources = list(offsets)
    for _target, _fields, _dedupe, position in entries:
        if position is not None and position.key not in offsets and position.key not in sources:
            sources.append(position.key)
    keys: list[str] = list(sources)
    index: dict[str, int] = {key: position + 1 for position, key in enumerate(keys)}

    def key_index(key: str) -> int:
        found = index.get(key)
        if found is None:
            keys.append(key)
            found = index[key] = len(keys)
        return found

    per_entry: list[Any] = []
    for target, fields, dedupe_key, position in entries:
        flat = [part for pair in fields.items() for part in pair]
        offset = None if position is None else position.offset
        per_entry += (
            key_index(target.name),
            "" if target.maxlen is None else target.maxlen,
            0 if dedupe_key is None else key_index(dedupe_key),
            0 if position is None or offset is None else index[position.key],
            0 if offset is None else offset,
            len(flat),
            *flat,
        )
    to_record = [offsets[key] if record and key in offsets else "" for key in sources]
    head = [window_ms, len(sources), *to_record]
    return ["EVALSHA", RECORDING_SCRIPT, len(keys), *keys, *head, *per_entry]


def record_call(offsets: Mapping[str, int]) -> list[Any]:
    return ["EVALSHA", RECORD_SCRIPT, len(offsets), *offsets, *offsets.values()]


def parse_offsets(keys: Sequence[str], values: Sequence[Any]) -> dict[str, int]:
    """MGET's reply as recorded offsets; ValueError naming a key that holds something else."""
    found: dict[str, int] = {}
    for key, value in zip(keys, values, strict=True):
        offset = parse_recorded(key, value)
        if offset is not None:
            found[key] = offset
    return found
