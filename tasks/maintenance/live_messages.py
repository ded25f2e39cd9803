"""Which jobs still have a message in Redis, and which messages a dead worker left behind.

kombu's Redis transport keeps a message in one of two places: the queue's list (``llm.openai``,
and ``llm.openai\\x06\\x16<n>`` per priority step), waiting; or, once a worker took it, the
``unacked`` hash (delivery tag → the message), with its delivery time in the ``unacked_index``
sorted set, until it is acknowledged. A retry waiting for its countdown is a message a worker
took and holds, with an ``eta`` header. A message in neither place is lost: kombu pops it from the
list and records it in ``unacked`` in a second command, so a worker killed (or Redis restarted)
between the two drops it, and only the job store can notice.

A message counts as live when it waits in a queue list, or when a worker took it less than
``grace_s`` (``DQ_RESEND_AFTER_S``) ago or holds it for an ``eta`` that is not ``grace_s`` past. An
older unacknowledged message belongs to a worker that is gone, or that lost its connection to
Redis while Redis was down (it tries to put its messages back when the connection drops, which
then fails): kombu hands it out again only after the visibility timeout (an hour by default),
which is what the sweeper does not wait for. The scan reports those as *abandoned* (their
delivery tags), so the sweeper can delete them once it has sent their jobs again: no duplicate
comes back an hour later.

The scans run as Lua, a page at a time, and return only the ids (and tags) asked about: the
messages themselves (which hold prompts) never leave Redis, and no call blocks Redis for long.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from kombu.transport import redis as kombu_redis

from datus_queue.tasks.routing import queue_for

__all__ = ["PAGE", "MessageScan", "drop_abandoned", "queue_lists", "scan_messages"]

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
    found[#found + 1] = entries[i]
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


@dataclass
class MessageScan:
    """What the scan found for the jobs asked about."""

    live: set[str] = field(default_factory=set)  # job ids with a live message
    abandoned: dict[str, list[str]] = field(default_factory=dict)  # job id -> delivery tags a gone worker left


def scan_messages(client: object, job_ids: Collection[str], providers: Iterable[str], now: datetime,
                  grace_s: float) -> MessageScan:
    """The messages of ``job_ids`` in the providers' queue lists and kombu's unacked hash (see the
    module docstring)."""
    scan = MessageScan()
    wanted = sorted(set(job_ids))
    if not wanted:
        return scan
    scan_list = client.register_script(_LIST_LUA)  # type: ignore[attr-defined]
    for name in queue_lists(providers):  # lists first: a message taken meanwhile is in unacked by then
        start = 0
        while True:  # a page at a time from the head: pushes only shift messages later, pops take the tail
            count, found = scan_list(keys=[name], args=[start, start + PAGE - 1, *wanted])
            scan.live.update(_text(job_id) for job_id in found)
            if int(count) < PAGE:
                break
            start += PAGE
    since = now.timestamp() - grace_s
    scan_unacked = client.register_script(_UNACKED_LUA)  # type: ignore[attr-defined]
    cursor: bytes | str | int = 0
    while True:
        cursor, found = scan_unacked(keys=[kombu_redis.Channel.unacked_key, kombu_redis.Channel.unacked_index_key],
                                     args=[cursor, PAGE, *wanted])
        for i in range(0, len(found), 4):
            job_id, eta, delivered, tag = (_text(value) for value in found[i:i + 4])
            if (delivered and float(delivered) >= since) or (eta and _timestamp(eta) >= since):
                scan.live.add(job_id)
            else:
                scan.abandoned.setdefault(job_id, []).append(tag)
        if _text(cursor) == "0":
            return scan


def drop_abandoned(client: object, tags: Collection[str]) -> None:
    """Delete abandoned messages from kombu's unacked hash (their jobs were sent again). A worker
    that still holds one after all acknowledges it with the same deletes, which are then no-ops."""
    if not tags:
        return
    with client.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
        pipe.zrem(kombu_redis.Channel.unacked_index_key, *tags)
        pipe.hdel(kombu_redis.Channel.unacked_key, *tags)
        pipe.execute()


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
