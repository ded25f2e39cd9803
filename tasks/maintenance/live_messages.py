"""Which jobs still have a message in Redis.

kombu's Redis transport keeps a message in one of two places: the queue's list (``llm.openai``,
and ``llm.openai\\x06\\x16<n>`` per priority step), waiting; or, once a worker took it, the
``unacked`` hash (delivery tag → the message), with its delivery time in the ``unacked_index``
sorted set, until it is acknowledged. A retry waiting for its countdown is a message a worker
took and holds, with an ``eta`` header. A message that is in neither place is lost — a Redis
restart between a worker's pop and its unacked write drops it that way — and only the job
store can notice.

A message counts as live when it waits in a queue list, or when a worker took it less than a
lease ago or holds it for an ``eta`` that is not a lease past. An older unacknowledged message
belongs to a worker that is gone: kombu hands it out again only after the visibility timeout
(an hour by default), which is what the sweeper does not wait for.

The scans run as Lua, a page at a time, and return only the ids asked about: the messages
themselves (which hold prompts) never leave Redis, and no call blocks Redis for long.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

from kombu.transport import redis as kombu_redis

from datus_queue.tasks.routing import queue_for

__all__ = ["PAGE", "live_job_ids", "queue_lists"]

PAGE = 500
# A message's JSON (kombu writes it with json.dumps: `"key": "value"`) has its headers' "id"
# (the task id = the job id) as the first `"id": "`: the body before it is base64, and
# "correlation_id", "root_id" … do not match. Plain string.find: no pattern matching over the body.
_FIELD_LUA = """
local function field(message, name)
  local _, stop = string.find(message, '"' .. name .. '": "', 1, true)
  if not stop then return nil end
  local close = string.find(message, '"', stop + 1, true)
  return close and string.sub(message, stop + 1, close - 1)
end
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
"""
_LIST_LUA = _FIELD_LUA + """
local items = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
local found = {}
for _, message in ipairs(items) do
  local id = field(message, 'id')
  if id and wanted[id] then found[#found + 1] = id end
end
return {#items, found}
"""
_UNACKED_LUA = _FIELD_LUA + """
local page = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local entries = page[2]
local found = {}
for i = 1, #entries, 2 do
  local message = entries[i + 1]
  local id = field(message, 'id')
  if id and wanted[id] then
    found[#found + 1] = id
    found[#found + 1] = field(message, 'eta') or ''
    found[#found + 1] = redis.call('ZSCORE', KEYS[2], entries[i]) or ''
  end
end
return {page[1], found}
"""


def queue_lists(providers: Iterable[str]) -> list[str]:
    """The Redis lists that hold the providers' waiting messages (one per priority step)."""
    channel = kombu_redis.Channel
    names: list[str] = []
    for provider in sorted(set(providers)):
        queue = queue_for(provider)
        names += [f"{queue}{channel.sep}{step}" if step else queue for step in kombu_redis.PRIORITY_STEPS]
    return names


def live_job_ids(client: object, job_ids: Collection[str], providers: Iterable[str], now: datetime,
                 lease_s: float) -> set[str]:
    """The jobs among ``job_ids`` with a live message (see the module docstring)."""
    wanted = sorted(set(job_ids))
    if not wanted:
        return set()
    live: set[str] = set()
    scan_list = client.register_script(_LIST_LUA)  # type: ignore[attr-defined]
    for name in queue_lists(providers):  # lists first: a message taken meanwhile is in unacked by then
        start = 0
        while True:  # a page at a time from the head: pushes only shift messages later, pops take the tail
            count, found = scan_list(keys=[name], args=[start, start + PAGE - 1, *wanted])
            live.update(_text(job_id) for job_id in found)
            if int(count) < PAGE:
                break
            start += PAGE
    since = now.timestamp() - lease_s
    scan_unacked = client.register_script(_UNACKED_LUA)  # type: ignore[attr-defined]
    cursor: bytes | str | int = 0
    while True:
        cursor, found = scan_unacked(keys=[kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key],
                                     args=[cursor, PAGE, *wanted])
        for i in range(0, len(found), 3):
            job_id, eta, delivered = _text(found[i]), _text(found[i + 1]), _text(found[i + 2])
            if (delivered and float(delivered) >= since) or (eta and _timestamp(eta) >= since):
                live.add(job_id)
        if _text(cursor) == "0":
            return live


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
