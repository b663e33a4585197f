"""The Lua scripts of the Redis backend, and the pure code that packs their arguments.

Layout (see ``_codec``): a user's document is a hash whose fields are encoded
paths and whose values are JSON text written by Python; ``#v`` holds the
version and ``#s`` the stored size. Lua compares and copies these strings but
never decodes a value, so cjson cannot round a number, turn ``[]`` into ``{}``
or escape a ``/``.

An update reads only the fields its patch names (plus ``#v`` and ``#s``) and
keeps the size up to date from their lengths. Only a write that replaces or
deletes a whole object, a reset and a compare-and-set read the whole hash.

Every script checks everything (key types, the version, the operation id, the
size limit) before its first write, so a refused write leaves the stored data
exactly as it was. Replies carry the document as one string: fields and values
joined by newlines, which compact JSON never contains unescaped.
"""

from __future__ import annotations

from typing import Final

from chatstate.state._backend import MAX_REMEMBERED_OPS, Delete, Edits, Replace, Reset, Write
from chatstate.state._codec import encode_path, encode_value, flatten
from chatstate.state._rules import SET

__all__ = ["APPLY_SCRIPT", "LOAD_SCRIPT", "write_args"]


_COMMON = r"""
local function corrupt(key, why)
  return {'corrupt', key, why}
end

-- The document's version and size (and the values of ``extra`` fields, fetched in
-- the same HMGET), after checking the key is one of ours.
local function read_meta(doc, extra)
  local meta
  if extra ~= nil and #extra > 0 and #extra < 4000 then
    meta = redis.pcall('HMGET', doc, '#v', '#s', unpack(extra))
  else
    meta = redis.pcall('HMGET', doc, '#v', '#s')
  end
  if meta['err'] then
    return nil, corrupt(doc, 'the key holds a ' .. redis.call('TYPE', doc)['ok'] ..
      ', not a chatstate hash')
  end
  if not meta[1] then
    if redis.call('EXISTS', doc) == 1 then
      return nil, corrupt(doc, 'the hash has no version field')
    end
    return {0, 0, meta}
  end
  local version, size = tonumber(meta[1]), tonumber(meta[2])
  if version == nil or size == nil then
    return nil, corrupt(doc, 'the version or size field is not a number')
  end
  return {version, size, meta}
end

local function chunked(cmd, key, items)
  local out = {}
  for s = 1, #items, 1000 do
    local part = redis.call(cmd, key, unpack(items, s, math.min(s + 999, #items)))
    if type(part) == 'table' then
      for j = 1, #part do out[#out + 1] = part[j] end
    end
  end
  return out
end

local function dump(doc)
  return table.concat(redis.call('HGETALL', doc), '\n')
end
"""

LOAD_SCRIPT: Final = (
    _COMMON
    + r"""
-- KEYS[1] document; ARGV[1] an echo the caller checks against its request
local meta, err = read_meta(KEYS[1])
if meta == nil then return err end
return {'ok', ARGV[1], meta[1], 0, dump(KEYS[1])}
"""
)

APPLY_SCRIPT: Final = (
    _COMMON
    + r"""
-- KEYS[1] document hash, KEYS[2] remembered operation ids (zset: id -> version it made)
-- ARGV[1] op id (echoed); ARGV[2] the parameters, newline-separated: dedupe ms,
-- ttl ms or '', max bytes, mode ('e' edits, 'r' reset, 'x' replace, 'D' delete),
-- expected version or ''; ARGV[3] the mode's arguments, newline-separated. (Paths
-- and values are compact JSON, which never holds a raw newline; one argument
-- instead of one per path saves redis-py most of its packing work.)
local function split(text)
  local out, n = {}, 0
  if text == '' then return out end
  for part in string.gmatch(text .. '\n', '([^\n]*)\n') do
    n = n + 1
    out[n] = part
  end
  return out
end
local P, A = split(ARGV[2]), split(ARGV[3])
local doc, opskey, op_id, mode = KEYS[1], KEYS[2], ARGV[1], P[4]
local dedupe, ttl, max_bytes, expected = P[1], P[2], tonumber(P[3]), P[5]

-- Parse the edits: kinds, paths, values.
local kinds, paths, values = {}, {}, {}
if mode == 'e' then
  local i = 1
  while i <= #A do
    local a = A[i]
    local n = #kinds + 1
    kinds[n], paths[n] = string.sub(a, 1, 1), string.sub(a, 2)
    if kinds[n] == 's' then
      values[n] = A[i + 1]
      i = i + 2
    else
      i = i + 1
    end
  end
end

local meta, err = read_meta(doc, paths)
if meta == nil then return err end
local version, size = meta[1], meta[2]

local seen = redis.pcall('ZSCORE', opskey, op_id)
if type(seen) == 'table' and seen['err'] then
  return corrupt(opskey, 'the key is not a sorted set of operation ids')
end
if seen then
  return {'duplicate', op_id, version, tonumber(seen), dump(doc)}
end
if mode == 'e' and expected ~= '' and tonumber(expected) ~= version then
  return {'conflict', op_id, version, 0, dump(doc)}
end

local changes = nil  -- path -> new value, or false to delete
if mode == 'e' then
  local stored
  if #paths < 4000 then
    stored = {}
    for j = 1, #paths do stored[j] = meta[3][j + 2] end
  else
    stored = chunked('HMGET', doc, paths)
  end
  local whole = false
  for j = 1, #kinds do
    if kinds[j] ~= 'o' and stored[j] == '{}' then whole = true end
  end
  if not whole then
    -- Fast path: no subtree goes away, so only the named fields change.
    local cur, orig = {}, {}
    for j = 1, #paths do
      if orig[paths[j]] == nil then
        orig[paths[j]] = stored[j] or false
        cur[paths[j]] = stored[j] or false
      end
    end
    for j = 1, #kinds do
      local p = paths[j]
      if kinds[j] == 's' then
        cur[p] = values[j]
      elseif kinds[j] == 'd' then
        cur[p] = false
      elseif cur[p] ~= '{}' then
        cur[p] = '{}'
      end
    end
    changes = {}
    for p, v in pairs(cur) do
      local o = orig[p]
      if v ~= o then
        if o then size = size - #p - #o end
        if v then size = size + #p + #v end
        changes[p] = v
      end
    end
  end
end

if changes == nil and mode ~= 'D' then
  -- Whole-document path: read every field, compute the new set, diff.
  local flat = redis.call('HGETALL', doc)
  local fields = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.byte(f, 1) == 34 then
      fields[f] = flat[i + 1]
    elseif f ~= '#v' and f ~= '#s' then
      return corrupt(doc, 'the hash has a field that is not a chatstate path')
    end
  end
  local new = {}
  if mode == 'e' then
    for f, v in pairs(fields) do new[f] = v end
    local function drop(p)
      local old = new[p]
      if old == '{}' then
        local n = #p
        for f in pairs(new) do
          if string.sub(f, 1, n) == p then new[f] = nil end
        end
      elseif old ~= nil then
        new[p] = nil
      end
    end
    for j = 1, #kinds do
      local p = paths[j]
      if kinds[j] == 's' then
        drop(p)
        new[p] = values[j]
      elseif kinds[j] == 'd' then
        drop(p)
      elseif new[p] ~= '{}' then
        new[p] = '{}'
      end
    end
  elseif mode == 'r' then
    -- groups: path, number of ancestors, the ancestors' paths
    local i = 1
    while i <= #A do
      local p, n = A[i], tonumber(A[i + 1])
      local old = fields[p]
      if old ~= nil then
        if old == '{}' then
          local len = #p
          for f, v in pairs(fields) do
            if string.sub(f, 1, len) == p then new[f] = v end
          end
        else
          new[p] = old
        end
        for j = 1, n do new[A[i + 1 + j]] = '{}' end
      end
      i = i + 2 + n
    end
  elseif mode == 'x' then
    if tonumber(expected) ~= version then
      return {'conflict', op_id, version, 0, dump(doc)}
    end
    for i = 1, #A, 2 do new[A[i]] = A[i + 1] end
  else
    return redis.error_reply('chatstate: unknown mode')
  end
  changes = {}
  size = 0
  for f, v in pairs(new) do
    size = size + #f + #v
    if fields[f] ~= v then changes[f] = v end
  end
  for f in pairs(fields) do
    if new[f] == nil then changes[f] = false end
  end
end

if size > max_bytes then
  return {'too_large', op_id, size}
end

-- Everything is checked: from here on the script only writes.
if mode == 'D' then
  redis.call('DEL', doc, opskey)
  version = 0
else
  version = version + 1
  local sets, dels = {'#v', version, '#s', size}, {}
  for f, v in pairs(changes) do
    if v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = f
    end
  end
  chunked('HDEL', doc, dels)
  chunked('HSET', doc, sets)
  if ttl ~= '' then redis.call('PEXPIRE', doc, ttl) end
end

-- Remember the operation: the newest ids, for dedupe ms after the user's last write.
redis.call('ZADD', opskey, version, op_id)
if version % 16 == 0 then
  redis.call('ZREMRANGEBYRANK', opskey, 0, -"""
    + str(MAX_REMEMBERED_OPS + 1)
    + r""")
end
redis.call('PEXPIRE', opskey, dedupe)
if mode == 'D' then return {'applied', op_id, 0, 0, ''} end
return {'applied', op_id, version, version, dump(doc)}
"""
)


def write_args(write: Write) -> list[str]:
    """Pack a write into the apply script's three arguments."""
    op = write.operation
    body: list[str] = []
    expected: int | str = ""
    if isinstance(op, Edits):
        mode = "e"
        expected = "" if op.expected_version is None else op.expected_version
        for kind, path, value in op.edits:
            body.append(kind + encode_path(path))
            if kind == SET:
                body.append(encode_value(value))
    elif isinstance(op, Reset):
        mode = "r"
        for path in op.preserved:
            body.append(encode_path(path))
            body.append(str(len(path) - 1))
            body.extend(encode_path(path[:i]) for i in range(1, len(path)))
    elif isinstance(op, Replace):
        mode = "x"
        expected = op.expected_version
        for item in flatten(op.data).items():
            body.extend(item)
    else:
        assert isinstance(op, Delete)
        mode = "D"
    ttl = "" if write.ttl_ms is None else write.ttl_ms
    params = f"{write.dedupe_ms}\n{ttl}\n{write.max_bytes}\n{mode}\n{expected}"
    return [write.op_id, params, "\n".join(body)]
