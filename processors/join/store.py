"""The joiner's Redis state: one msgpack'd entry per request, merged atomically by Lua.

Keys (``<prefix>`` is the topic prefix + ``join:``, so deployments and tests never collide):

* ``<prefix>s:<request_id>``: the state (a string holding msgpack, cheaper than a hash for
  ~500-byte values): ``i`` = primary part, ``s`` = {challenger: part}, ``f`` = feedback part
  (each with the id of the message that brought it), ``v`` = {challenger: last version},
  ``o`` = claim token while the sweeper publishes its orphans.
* ``<prefix>deadlines``: sorted set request id -> deadline (first seen + horizon, ms). Key
  expiry alone would lose what never joined; the sweeper claims what is due instead.
* ``<prefix>t:<request_id>``: tombstone of a swept request for one more horizon: versions and
  what was seen, so a late part is told apart from an unknown one and never re-uses a version.

Merge rules (``MERGE_LUA``): the first primary part and the first answer of each challenger
win (a re-scored duplicate changes nothing); feedback with a later event time replaces the
stored one (ties: the larger digest, so the result does not depend on arrival order). A part
that changes nothing emits nothing, **unless it is the very message that was stored**
(same partition/offset): that is a redelivery after a crash, whose outputs may never have
been published, so the current records are re-emitted with their current versions.

On a Redis Cluster (:class:`ClusterJoinStore`) every key above carries a hash tag, the
request's *group* ``{g}`` (``g`` = CRC-32 of the request id mod :data:`GROUPS`) right after
the prefix: ``<prefix>{g}:s:<request_id>``, ``<prefix>{g}:t:<request_id>`` and one sorted
set per group, ``<prefix>{g}:deadlines``. So a request, its tombstone and the index it is in
share one hash slot, and a chunk of merges (or a claim) of one group touches one slot; the
scripts are the same. ``<prefix>layouts`` is a single key, written before the merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from shadowpipe.processors.join.parts import FeatureLayouts

CHUNK = 100  # messages per script call: Redis merges one while Python decodes the next

# Reply codes of the merge script.
DUPLICATE, STORED, JOINED, REDELIVERED, LATE_FEEDBACK, LATE_PREDICTION, LATE_INFERENCE = range(7)
CODE_NAMES = ("duplicate", "stored", "joined", "redelivered", "late_feedback",
              "late_prediction", "late_inference")

_COMMON_LUA = """
local function opt(part) if part then return part[1] end return false end
"""

# KEYS: deadlines, then per part its state and tombstone keys.
# ARGV: now ms, horizon ms, ttl ms, length of the state key prefix, then per part
#       kind (i|s|f), challenger, part, message id, rank.
# Reply, flat, per part: code, n, and when n > 0: primary|false, feedback|false,
#       n x (challenger, version, shadow|false).
MERGE_LUA = _COMMON_LUA + """
local now, horizon, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local plen = tonumber(ARGV[4])
local out, n = {}, 0
local kind, ch, part, mid, rank, skey, tkey

local function put(v) n = n + 1; out[n] = v end

local function late(t)
  if kind == 'i' then
    if t.li then put(0); put(0); return end
    t.li = 1
    redis.call('SET', tkey, cmsgpack.pack(t), 'KEEPTTL')
    put(6); put(0); return
  end
  local slot, digest = ch, false
  if kind == 'f' then slot = ''; digest = redis.sha1hex(part) end
  t.m = t.m or {}
  local known = t.v[slot] ~= nil
  if kind == 'f' then known = t.h == digest end
  local fb, sh = false, false
  if kind == 'f' then fb = part else sh = part end
  if known then
    if t.m[slot] == mid then put(3); put(1); put(false); put(fb); put(slot); put(t.v[slot]); put(sh)
    else put(0); put(0) end
    return
  end
  -- Same rule as in a live state: only a later (or tie-winning) label replaces the known one.
  if digest and t.fr and (rank < t.fr or (rank == t.fr and digest < t.h)) then
    put(0); put(0); return
  end
  t.v[slot] = (t.v[slot] or 0) + 1
  t.m[slot] = mid
  if digest then t.h = digest; t.fr = rank end
  redis.call('SET', tkey, cmsgpack.pack(t), 'KEEPTTL')
  if kind == 'f' then put(4) else put(5) end
  put(1); put(false); put(fb); put(slot); put(t.v[slot]); put(sh)
end

local function merge()
  local raw = redis.call('GET', skey)
  local st
  if raw then
    st = cmsgpack.unpack(raw)
  else
    local traw = redis.call('GET', tkey)
    if traw then return late(cmsgpack.unpack(traw)) end
    st = {s = {}, v = {}}
  end

  local changed, again = false, false
  if kind == 'i' then
    if not st.i then st.i = {part, mid}; changed = true
    elseif st.i[2] == mid then again = true end
  elseif kind == 's' then
    local cur = st.s[ch]
    if not cur then st.s[ch] = {part, mid}; changed = true
    elseif cur[2] == mid then again = true end
  else
    local cur = st.f
    if not cur or rank > cur[3] or (rank == cur[3] and part ~= cur[1]
        and redis.sha1hex(part) > redis.sha1hex(cur[1])) then
      st.f = {part, mid, rank}; changed = true
    elseif cur[2] == mid then again = true end
  end
  if not changed and not again then put(0); put(0); return end

  -- Code and count are filled in once the emitted triples are known.
  local head = n + 1
  put(0); put(0); put(opt(st.i)); put(opt(st.f))
  local emitted = 0
  local function emit(c)
    local sp = st.s[c]
    if st.i and sp then
      if changed then st.v[c] = (st.v[c] or 0) + 1 end
      if st.v[c] then
        put(c); put(st.v[c]); put(sp[1]); emitted = emitted + 1
      end
    end
  end
  if kind == 's' then emit(ch) else for c, _ in pairs(st.s) do emit(c) end end

  if changed then
    st.o = nil
    if raw then
      redis.call('SET', skey, cmsgpack.pack(st), 'KEEPTTL')
    else
      redis.call('SET', skey, cmsgpack.pack(st), 'PX', ttl)
      redis.call('ZADD', KEYS[1], now + horizon, string.sub(skey, plen + 1))
    end
  end
  if emitted == 0 then
    for j = head, n do out[j] = nil end
    n = head - 1
    if changed then put(1) else put(0) end
    put(0)
    return
  end
  if again then out[head] = 3 else out[head] = 2 end
  out[head + 1] = emitted
end

for j = 0, (#ARGV - 4) / 5 - 1 do
  local a = 5 + 5 * j
  kind, ch, part, mid, rank = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  skey, tkey = KEYS[2 + 2 * j], KEYS[3 + 2 * j]
  merge()
end
return out
"""

_TOMBSTONE_LUA = """
local function bury(key, tkey, zset, rid, st, tomb_ttl)
  local t = {v = st.v}
  if st.i then t.li = 1 end
  if st.f then t.h = redis.sha1hex(st.f[1]); t.fr = st.f[3] end
  redis.call('SET', tkey, cmsgpack.pack(t), 'PX', tomb_ttl)
  redis.call('DEL', key)
  redis.call('ZREM', zset, rid)
end
"""

# KEYS: deadlines. ARGV: state prefix, tombstone prefix, now ms, limit, lease ms, token, tomb ttl.
# Reply: per due request {rid, 'expired'} | {rid, 'done', has_primary, n_shadows, has_feedback}
#        | {rid, 'orphans', primary|false, feedback|false, challenger, version, shadow|false, ...}
CLAIM_LUA = _COMMON_LUA + _TOMBSTONE_LUA + """
local sp, tp, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, token, tomb_ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  local raw = redis.call('GET', sp .. rid)
  if not raw then
    redis.call('ZREM', KEYS[1], rid)
    out[#out + 1] = {rid, 'expired'}
  else
    local st = cmsgpack.unpack(raw)
    local rec = {rid, 'orphans', opt(st.i), opt(st.f)}
    if not st.i then
      for c, part in pairs(st.s) do
        if not st.o then st.v[c] = (st.v[c] or 0) + 1 end
        rec[#rec + 1] = c; rec[#rec + 1] = st.v[c]; rec[#rec + 1] = part[1]
      end
      if st.f then
        if not st.o then st.v[''] = (st.v[''] or 0) + 1 end
        rec[#rec + 1] = ''; rec[#rec + 1] = st.v['']; rec[#rec + 1] = false
      end
    end
    if #rec == 4 then
      local n = 0
      for _ in pairs(st.s) do n = n + 1 end
      bury(sp .. rid, tp .. rid, KEYS[1], rid, st, tomb_ttl)
      out[#out + 1] = {rid, 'done', st.i and 1 or 0, n, st.f and 1 or 0}
    else
      st.o = token
      redis.call('SET', sp .. rid, cmsgpack.pack(st), 'KEEPTTL')
      redis.call('ZADD', KEYS[1], now + lease, rid)
      out[#out + 1] = rec
    end
  end
end
return out
"""

# KEYS: deadlines. ARGV: state prefix, tombstone prefix, token, tomb ttl, request ids...
# Buries the claimed requests whose state did not change since the claim; returns how many.
FINISH_LUA = _TOMBSTONE_LUA + """
local sp, tp, token, tomb_ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = 0
for i = 5, #ARGV do
  local rid = ARGV[i]
  local raw = redis.call('GET', sp .. rid)
  if raw then
    local st = cmsgpack.unpack(raw)
    if st.o == token then
      bury(sp .. rid, tp .. rid, KEYS[1], rid, st, tomb_ttl)
      n = n + 1
    end
  end
end
return n
"""


class StoreError(RuntimeError):
    """Redis refused or failed some merges of a batch; ``oom`` when it is out of memory."""

    def __init__(self, message: str, oom: bool) -> None:
        super().__init__(message)
        self.oom = oom


class Part(NamedTuple):  # a tuple: built for every message, cheaper than a dataclass
    """One input message, reduced to what the store keeps.

    ``kind`` is ``i`` (primary), ``s`` (shadow) or ``f`` (feedback); ``rank`` orders
    feedback (its event time); ``msg_id`` identifies the Kafka message (:func:`message_id`).
    """

    kind: str
    request_id: str
    challenger: str
    blob: bytes
    rank: int
    msg_id: int


def message_id(partition: int, offset: int) -> int:
    """One number for a message of a known topic (exact in Lua's doubles below 2**53).

    >>> message_id(3, 10) == 3 * 2**40 + 10
    True
    """
    return (partition << 40) | offset


class Emission(NamedTuple):
    """A JoinedRecord to publish: its key fields and the stored parts it is built from."""

    request_id: str
    challenger: str
    version: int
    primary: bytes | None
    shadow: bytes | None
    feedback: bytes | None


def emissions(request_id: str, primary: Any, feedback: Any, triples: Sequence[Any]) -> list[
        Emission]:
    """Emissions from a script reply's ``primary, feedback, (challenger, version, shadow)*``."""
    out = []
    for n in range(0, len(triples), 3):
        challenger, version, shadow = triples[n:n + 3]
        out.append(Emission(request_id, _text(challenger), int(version), primary or None,
                            shadow or None, feedback or None))
    return out


# Per part: (code, primary, feedback, flat ``challenger, version, shadow`` triples).
Merged = tuple[int, Any, Any, list[Any]]


def _results(parts: list[Part], reply: list[Any]) -> list[Merged]:
    """Split the merge script's flat reply per part (slices, no per-record objects)."""
    out: list[Merged] = []
    pos = 0
    for _ in parts:
        code, n = reply[pos], reply[pos + 1]
        if n:
            end = pos + 4 + 3 * n
            out.append((code, reply[pos + 2], reply[pos + 3], reply[pos + 4:end]))
            pos = end
        else:
            out.append((code, None, None, []))
            pos += 2
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Claim:
    """What one sweep claimed: orphans to publish, then :meth:`JoinStore.finish`."""

    token: str
    orphans: list[Emission]
    claimed: list[str]
    outcomes: dict[str, int]
    handled: int = 0


class JoinStore:
    """Redis side of the joiner for one key prefix and feedback horizon."""

    def __init__(self, client: Any, prefix: str, horizon_s: float, lease_s: float = 60.0) -> None:
        self.client = client
        self.prefix = prefix
        self.horizon_ms = int(horizon_s * 1000)
        self.lease_ms = int(lease_s * 1000)
        # Safety net only: the sweeper buries states at the horizon; TTL catches a stopped one.
        self.ttl_ms = 2 * self.horizon_ms + self.lease_ms
        self.deadlines = prefix + "deadlines"
        self._space = (f"{prefix}s:", f"{prefix}t:", self.deadlines)  # state, tomb, index
        self.layouts_key = prefix + "layouts"
        self.layouts = FeatureLayouts(lambda ids: client.hmget(self.layouts_key, ids))
        self._merge_sha = hashlib.sha1(MERGE_LUA.encode()).hexdigest()
        self._claim = client.register_script(CLAIM_LUA)
        self._finish = client.register_script(FINISH_LUA)
        self._load_merge()

    def _load_merge(self) -> None:
        import redis

        try:
            self.client.script_load(MERGE_LUA)
        except redis.RedisError as exc:
            raise StoreError(f"cannot load the merge script: {exc}", oom=False) from exc

    def state_key(self, request_id: str) -> str:
        return f"{self.prefix}s:{request_id}"

    def merge(self, parts: list[Part], now_ms: int) -> list[tuple[int, list[Emission]]]:
        """Apply ``parts`` in order (one script call per chunk); per part (code, emissions).

        Raises :class:`StoreError` if any merge failed: the caller retries the whole batch,
        which is safe because re-applying a stored message re-emits rather than duplicates.
        """
        return [(code, emissions(p.request_id, primary, feedback, flat))
                for chunk, replies in self.merge_chunks([parts], now_ms)
                for p, (code, primary, feedback, flat) in zip(chunk, replies, strict=True)]

    def merge_chunks(self, chunks: Iterable[list[Part]], now_ms: int) -> Iterator[
            tuple[list[Part], list[Merged]]]:
        """:meth:`merge` for a stream of chunks on one connection, one chunk ahead: Redis
        merges chunk k while the caller decodes chunk k+1 and builds the records of k-1."""
        import redis

        pool = self.client.connection_pool
        try:  # connects: a Redis that is down or restarting fails here, retried like the rest
            conn = pool.get_connection()
        except redis.RedisError as exc:
            raise StoreError(f"Redis unreachable: {exc}", oom=False) from exc
        clean = False
        try:
            inflight: tuple[list[Part], list[bytes]] | None = None
            for parts in chunks:
                sent = self._send(conn, parts, now_ms)
                if inflight is not None:
                    yield inflight[0], self._receive(conn, *inflight)
                inflight = sent
            if inflight is not None:
                yield inflight[0], self._receive(conn, *inflight)
            clean = True
        except redis.RedisError as exc:  # connection lost, timeout: the batch is retried
            raise StoreError(f"Redis pipeline failed: {exc}", oom="OOM" in str(exc)) from exc
        finally:
            if not clean:  # replies may be pending on it
                conn.disconnect()
            pool.release(conn)

    def _send(self, conn: Any, parts: list[Part], now_ms: int,
              space: tuple[str, str, str] | None = None) -> tuple[list[Part], list[bytes]]:
        commands: list[tuple[Any, ...]] = []
        layout_ids = list(self.layouts.unsaved)
        if layout_ids:  # before the merges that refer to them, on the same connection
            pairs = [x for lid in layout_ids for x in (lid, self.layouts.unsaved[lid])]
            commands.append(("HSET", self.layouts_key, *pairs))
        merge: Any = NotImplemented
        if parts:  # the whole chunk in one script call: one command to pack, parse, dispatch
            state, tomb, deadlines = space or self._space
            head = ("EVALSHA", self._merge_sha, 2 * len(parts) + 1, deadlines)
            middle = (now_ms, self.horizon_ms, self.ttl_ms, len(state))
            if _pack_merge is not None:  # RESP bytes straight from the parts
                merge = _pack_merge(head, state, tomb, middle, parts)
            if merge is NotImplemented:
                commands.append(merge_command(head, state, tomb, middle, parts))
        packed: list[bytes] = []
        if commands and _pack is not None:  # hiredis: one C call per command
            packed = [b"".join(_pack(c) for c in commands)]
        elif commands:
            packed = conn.pack_commands(commands)
        if merge is not NotImplemented:
            packed.append(merge)
        conn.send_packed_command(packed, check_health=False)
        return parts, layout_ids

    def _receive(self, conn: Any, parts: list[Part], layout_ids: list[bytes]) -> list[Merged]:
        import redis

        replies, errors = [], []
        for _ in range(bool(parts) + bool(layout_ids)):
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                errors.append(exc)
        if errors:
            # redis-py raises NoScriptError, whose text lacks the NOSCRIPT code.
            if any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                self._load_merge()  # Redis restarted or flushed its script cache
            raise StoreError(f"{len(errors)} Redis command(s) failed: {errors[0]}",
                             oom=any("OOM" in str(e) for e in errors))
        for lid in layout_ids:
            self.layouts.unsaved.pop(lid, None)
        return _results(parts, replies[-1]) if parts else []

    def claim(self, now_ms: int, limit: int = 500) -> Claim:
        """Claim up to ``limit`` requests past their deadline; bury those with no orphans."""
        claim = _new_claim()
        _absorb(claim, _run(self._claim, [self.deadlines], [
            self.prefix + "s:", self.prefix + "t:", now_ms, limit, self.lease_ms, claim.token,
            self.horizon_ms,
        ]))
        return claim

    def finish(self, claim: Claim) -> int:
        """Bury the claimed requests (after their orphans were published); returns how many."""
        if not claim.claimed:
            return 0
        args = [self.prefix + "s:", self.prefix + "t:", claim.token, self.horizon_ms,
                *claim.claimed]
        return int(_run(self._finish, [self.deadlines], args))

    def pending(self) -> int:
        """Requests waiting in the store (not yet swept)."""
        return int(self.client.zcard(self.deadlines))

    @property
    def witnesses(self) -> tuple[str, ...]:
        """Keys that exist while the store holds state (for the lost-state marker)."""
        return (self.deadlines, self.layouts_key)


def _new_claim() -> Claim:
    return Claim(uuid.uuid4().hex, [], [], {"expired_unswept": 0, "swept": 0,
                                            "swept_no_shadow": 0, "swept_unlabelled": 0})


def _absorb(claim: Claim, reply: list[Any]) -> None:
    """Add one claim script reply to ``claim``."""
    claim.handled += len(reply)
    for rec in reply:
        rid, what = _text(rec[0]), _text(rec[1])
        if what == "expired":
            claim.outcomes["expired_unswept"] += 1
        elif what == "done":
            claim.outcomes["swept"] += 1
            has_primary, n_shadows, has_feedback = (int(x) for x in rec[2:5])
            claim.outcomes["swept_no_shadow"] += int(has_primary and not n_shadows)
            claim.outcomes["swept_unlabelled"] += int(bool(n_shadows) and not has_feedback)
        else:
            claim.claimed.append(rid)
            claim.orphans.extend(emissions(rid, rec[2], rec[3], rec[4:]))


def merge_command(head: tuple[Any, ...], state: str, tomb: str, middle: tuple[Any, ...],
                  parts: list[Part]) -> tuple[Any, ...]:
    """The merge script call for ``parts``: ``head``, their state and tombstone keys,
    ``middle``, then five arguments per part (what ``_fastpath.pack_merge`` packs).

    >>> part = Part("f", "r", "", b"x", 9, 1)
    >>> merge_command(("EVALSHA", "sha", 3, "d"), "s:", "t:", (5,), [part])
    ('EVALSHA', 'sha', 3, 'd', 's:r', 't:r', 5, 'f', '', b'x', 1, 9)
    """
    keys = [k for p in parts for k in (state + p.request_id, tomb + p.request_id)]
    args = [x for p in parts for x in (p.kind, p.challenger, p.blob, p.msg_id, p.rank)]
    return (*head, *keys, *middle, *args)



GROUPS = 128  # hash-tag groups on a cluster: enough to spread over many masters' slots


def group_of(request_id: str) -> int:
    """The cluster group (hash tag) of a request.

    >>> group_of("r1") == zlib.crc32(b"r1") % GROUPS
    True
    """
    return zlib.crc32(request_id.encode()) % GROUPS


class ClusterJoinStore(JoinStore):
    """:class:`JoinStore` on a Redis Cluster (``redis.cluster.RedisCluster`` client).

    Keys of a request carry its group's hash tag (``<prefix>{g}:s:<rid>``...), each group has
    its own deadline index, merges are chunked per group and pipelined per master, and the
    sweep walks every group's index.

    >>> store = ClusterJoinStore.__new__(ClusterJoinStore)
    >>> store.prefix = "p."
    >>> store.space(7)
    ('p.{7}:s:', 'p.{7}:t:', 'p.{7}:deadlines')
    """

    def __init__(self, client: Any, prefix: str, horizon_s: float, lease_s: float = 60.0) -> None:
        if "{" in prefix or "}" in prefix:  # the first {...} of a key is its hash tag
            raise ValueError(f"key prefix {prefix!r} must not contain braces on Redis Cluster")
        super().__init__(client, prefix, horizon_s, lease_s)
        self._next_group = 0  # where the next sweep starts, so a busy group starves none

    def space(self, group: int) -> tuple[str, str, str]:
        """State prefix, tombstone prefix and deadline index of ``group``."""
        tagged = f"{self.prefix}{{{group}}}:"
        return tagged + "s:", tagged + "t:", tagged + "deadlines"

    def state_key(self, request_id: str) -> str:
        return self.space(group_of(request_id))[0] + request_id

    @property
    def witnesses(self) -> tuple[str, ...]:
        return (self.layouts_key, *(self.space(g)[2] for g in range(GROUPS)))

    def merge_chunks(self, chunks: Iterable[list[Part]], now_ms: int) -> Iterator[
            tuple[list[Part], list[Merged]]]:
        """Merge per group: every chunk's keys in one slot, all chunks of a master sent
        on one connection before any reply is read. A request's parts keep their order."""
        import redis

        groups: dict[int, list[Part]] = defaultdict(list)
        for chunk in chunks:  # decodes them all: new feature layouts are known after this
            for part in chunk:
                groups[group_of(part.request_id)].append(part)
        try:
            self._save_layouts()
            yield from self._merge_groups(groups, now_ms)
        except redis.RedisError as exc:
            self._refresh(exc)
            # redis-py turns a direct command's OOM reply into OutOfMemoryError, whose text
            # has lost the code (the layouts' HSET here); pipelined script replies keep it.
            oom = isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc)
            raise StoreError(f"Redis Cluster merge failed: {exc}", oom=oom) from exc

    def _save_layouts(self) -> None:
        """Feature layouts first, synchronously: merges on other masters refer to them."""
        unsaved = dict(self.layouts.unsaved)
        if unsaved:
            self.client.hset(self.layouts_key, mapping=unsaved)
            for lid in unsaved:
                self.layouts.unsaved.pop(lid, None)

    def _merge_groups(self, groups: dict[int, list[Part]], now_ms: int) -> Iterator[
            tuple[list[Part], list[Merged]]]:
        by_node: dict[str, tuple[Any, list[tuple[list[Part], tuple[str, str, str]]]]] = {}
        for group, parts in groups.items():
            space = self.space(group)
            node = self.client.get_node_from_key(space[2])
            calls = by_node.setdefault(node.name, (node, []))[1]
            calls.extend((parts[i:i + CHUNK], space) for i in range(0, len(parts), CHUNK))
        sent: list[tuple[Any, Any, list[tuple[list[Part], tuple[str, str, str]]]]] = []
        failed: list[BaseException] = []
        try:
            for node, calls in by_node.values():
                sent.append((node, self._send_all(node, calls, now_ms), calls))
            while sent:
                node, conn, calls = sent[0]
                yield from self._receive_all(node, conn, calls, failed)
                sent.pop(0)
        finally:
            for node, conn, _ in sent:  # not read to the end: drop, replies may be pending
                self._drop(node, conn)
        if failed:
            raise failed[0]

    def _send_all(self, node: Any, calls: list[tuple[list[Part], tuple[str, str, str]]],
                  now_ms: int) -> Any:
        conn = node.redis_connection.connection_pool.get_connection()
        try:
            for parts, space in calls:
                self._send(conn, parts, now_ms, space)
        except BaseException:
            self._drop(node, conn)
            raise
        return conn

    def _receive_all(self, node: Any, conn: Any,
                     calls: list[tuple[list[Part], tuple[str, str, str]]],
                     failed: list[BaseException]) -> Iterator[tuple[list[Part], list[Merged]]]:
        """Read every reply of one master, then release its connection; script errors are
        kept in ``failed`` and raised once all masters answered: the batch is retried."""
        import redis

        for parts, _ in calls:
            try:
                yield parts, self._receive(conn, parts, [])
            except StoreError as exc:  # a script error: the connection is still in sync
                failed.append(redis.ResponseError(str(exc)))
        node.redis_connection.connection_pool.release(conn)

    @staticmethod
    def _drop(node: Any, conn: Any) -> None:
        conn.disconnect()  # replies may be pending on it
        node.redis_connection.connection_pool.release(conn)

    def _refresh(self, exc: BaseException) -> None:
        """A master moved, failed or restarted: read the slot map again before the retry."""
        text = str(exc)
        if isinstance(exc, redis_connection_errors()) or any(
                code in text for code in ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
            # Still down: the batch's retry comes back here.
            with contextlib.suppress(Exception):
                self.client.nodes_manager.initialize()

    def claim(self, now_ms: int, limit: int = 500) -> Claim:
        """:meth:`JoinStore.claim` over every group's index, from where the last one ended."""
        claim = _new_claim()
        for step in range(GROUPS):
            group = (self._next_group + step) % GROUPS
            state, tomb, deadlines = self.space(group)
            _absorb(claim, _run(self._claim, [deadlines], [
                state, tomb, now_ms, limit - claim.handled, self.lease_ms, claim.token,
                self.horizon_ms]))
            if claim.handled >= limit:
                self._next_group = group
                break
        return claim

    def finish(self, claim: Claim) -> int:
        """Bury the claimed requests, one call per group."""
        groups: dict[int, list[str]] = defaultdict(list)
        for rid in claim.claimed:
            groups[group_of(rid)].append(rid)
        buried = 0
        for group, rids in groups.items():
            state, tomb, deadlines = self.space(group)
            buried += int(_run(self._finish, [deadlines],
                               [state, tomb, claim.token, self.horizon_ms, *rids]))
        return buried

    def pending(self) -> int | None:  # type: ignore[override]
        """Requests waiting, None while a master is unreachable: the stats endpoint that
        shows it must keep answering (with the retries counted) while a master is away."""
        import redis

        pipe = self.client.pipeline()
        for group in range(GROUPS):
            pipe.zcard(self.space(group)[2])
        try:
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError:
            return None


def redis_connection_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


def join_store(client: Any, prefix: str, horizon_s: float, lease_s: float = 60.0) -> JoinStore:
    """The store for ``client``: :class:`ClusterJoinStore` on a ``RedisCluster``."""
    from redis.cluster import RedisCluster

    cls = ClusterJoinStore if isinstance(client, RedisCluster) else JoinStore
    return cls(client, prefix, horizon_s, lease_s)

try:
    from hiredis import pack_command as _pack
except ImportError:  # pure-Python redis-py packing: correct, slower
    _pack = None
try:  # the compiled packer of the merge call (join/_fastpath.c); optional at install time
    from shadowpipe.processors.join._fastpath import pack_merge as _pack_merge
except ImportError:  # pragma: no cover - a build without a C compiler
    _pack_merge = None


def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
    import redis

    try:
        return script(keys=keys, args=args)
    except redis.RedisError as exc:
        raise StoreError(f"Redis script failed: {exc}", oom="OOM" in str(exc)) from exc


