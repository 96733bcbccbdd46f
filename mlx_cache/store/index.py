"""The session index: its strict schema, its bytes and checksum, and the values read from it.

Version 4 (written now) is version 3 with new KV files checked by segments
(``xxh3_128_mib``, see ``checksum.py``); files kept from older sessions keep
their checksums. Version 3 lists the KV files in ``kv.packs`` (a pack holds the
blocks of a token range, see ``packs.py``) and each block names its pack.
Version 2 named one file per block (with its size and checksum) and differed
from version 1 in three fields: the index checksum is xxh3-128
(``"checksum": "xxh3_128:<hex>"``, sha256 hex in v1), new KV files carry an
``xxh3_128`` checksum (files kept from a v1 session keep their ``sha256``),
and ``kv.dtype`` records the float type the KV was computed in. All four
versions are read; see ``docs/session-format.md``.

Anything malformed is refused even when its checksum is valid: a checksum only
proves the bytes are what some writer wrote, not that a reader can use them.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import xxhash

from ..config import CacheConfig, CacheConfigError
from .checksum import CHECKSUMS

FORMAT_NAME = "kvchat-session"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
BLOCK_TOKENS = 256  # tokens per KV block: small enough to share system prompts, big enough to keep files few
FLOAT_DTYPES = ("float16", "bfloat16", "float32")

#: Names of KV files an index may reference: block keys (optionally with a content
#: suffix), window snapshots (w-) and checkpoints (c-). Nothing else, so an index
#: can never point outside the blocks folder.
FILE_RE = re.compile(r"(?:[0-9a-f]{64}(?:-[0-9a-f]{16})?|[wc]-(?:[0-9a-f]{64}|[0-9a-f]{32}))\.safetensors\Z")
_U32 = next(c for c in "IL" if array.array(c).itemsize == 4)  # the 4-byte unsigned typecode
_HEX = {"xxh3_128_mib": re.compile(r"[0-9a-f]{32}\Z"), "xxh3_128": re.compile(r"[0-9a-f]{32}\Z"),
        "sha256": re.compile(r"[0-9a-f]{64}\Z")}
# the checksums a file entry may carry in each version (entries kept from older sessions keep theirs)
_ENTRY_CHECKSUMS = {1: ("sha256",), 2: ("xxh3_128", "sha256"), 3: ("xxh3_128", "sha256"), 4: CHECKSUMS}
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")


class SchemaError(ValueError):
    """The index does not follow the schema; the message names the field."""


def canonical_json(obj: Any) -> bytes:
    """One byte string per value: sorted keys, no spaces, UTF-8 (checksums hash this)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def index_bytes(index: dict[str, Any]) -> bytes:
    """A version-2 or later index file: canonical JSON with its xxh3-128 checksum as the first key.

    The checksum covers the bytes that follow it (see :func:`checksum_ok`).
    """
    body = canonical_json(index)
    return b'{"checksum":"xxh3_128:' + xxhash.xxh3_128_hexdigest(body).encode() + b'",' + body[1:]


def checksum_ok(version: int, checksum: Any, body: dict[str, Any], raw: bytes) -> bool:
    """Whether the index file's bytes pass their checksum.

    Versions 2 to 4: the file is ``{"checksum":"xxh3_128:<hex>",`` and then the rest
    of the canonical JSON, as :func:`index_bytes` writes it, and the checksum
    covers those bytes exactly. (Checking the canonical JSON of the parsed
    value instead would let a flipped digit through where it names the same
    number, as the last digits of a long float can.) Version 1 hashed the
    canonical JSON of the parsed value with sha256; its files are checked
    that way.
    """
    if version == 1:
        return checksum == hashlib.sha256(canonical_json(body)).hexdigest()
    if not isinstance(checksum, str):
        return False
    prefix = b'{"checksum":"' + checksum.encode() + b'",'
    return raw.startswith(prefix) and checksum == "xxh3_128:" + xxhash.xxh3_128_hexdigest(b"{" + raw[len(prefix):])


def block_key(prev_key: str, fingerprint: str, config_json: bytes, tokens: Sequence[int]) -> str:
    """Content address of one KV block (sha256: it names content, shared across sessions).

    Chained over the previous block's key, so a key names the whole token
    prefix up to the block's end, under one model and one cache layout.
    """
    h = hashlib.sha256()
    h.update(b"kvchat-block/1\0")
    h.update(prev_key.encode() + b"\0")
    h.update(fingerprint.encode() + b"\0")
    h.update(config_json + b"\0")
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.hexdigest()


def chain_keys(fingerprint: str, config_json: bytes, tokens: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[str]:
    """Keys of the blocks that cover `tokens`: full blocks, then a partial tail if any."""
    keys: list[str] = []
    prev = ""
    for start in range(0, len(tokens), block_tokens):
        prev = block_key(prev, fingerprint, config_json, tokens[start : start + block_tokens])
        keys.append(prev)
    return keys


def packs_of(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The block files of an index: its packs (v3), or one entry per block (v1, v2: each block is its own file)."""
    kv = index["kv"]
    return kv["packs"] if "packs" in kv else kv["blocks"]


def file_entries(index: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Every KV file an index names once (block files or packs, window snapshot, checkpoint)."""
    if not index:
        return
    kv = index["kv"]
    yield from (kv["packs"] if isinstance(kv.get("packs"), list) else kv["blocks"])
    for key in ("window", "checkpoint"):
        e = kv.get(key)
        if e is not None and e.get("file"):
            yield e


def checksum_of(entry: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) a file entry carries."""
    for algorithm in CHECKSUMS:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise KeyError("checksum")


# -- the schema ---------------------------------------------------------------------------


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise SchemaError(what)


def _int(x: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x <= hi)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _uint32s(xs: list[int]) -> bool:
    """Whether every int is in [0, 2**32): array's range check, three times faster than min() and max()."""
    try:
        array.array(_U32, xs)
    except OverflowError:
        return False
    return True


def _dict(x: Any, what: str, required: Sequence[str]) -> dict[str, Any]:
    _need(isinstance(x, dict), f"{what} is not an object")
    missing = [k for k in required if k not in x]
    _need(not missing, f"{what} lacks {', '.join(missing)}")
    return x


def _config(x: Any, what: str) -> None:
    try:
        CacheConfig.from_dict(x)
    except (CacheConfigError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise SchemaError(f"{what} is not a cache configuration ({e})") from None


def _file_entry(e: Any, what: str, version: int, nullable_file: bool = False) -> None:
    _dict(e, what, ("file", "bytes"))
    if nullable_file and e["file"] is None:
        _need(e["bytes"] == 0, f"{what} names no file but has bytes")
        return
    _need(isinstance(e["file"], str) and bool(FILE_RE.match(e["file"])), f"{what} names a file outside the store")
    _need(_int(e["bytes"], 1), f"{what} has a bad size")
    algorithms = [a for a in CHECKSUMS if a in e]
    _need(len(algorithms) == 1, f"{what} has no checksum" if not algorithms else f"{what} has more than one checksum")
    _need(algorithms[0] in _ENTRY_CHECKSUMS[version], f"{what} has a checksum its format version does not know")
    _need(isinstance(e[algorithms[0]], str) and bool(_HEX[algorithms[0]].match(e[algorithms[0]])), f"{what} has a bad checksum")


def _skeleton(x: Any, depth: int = 0) -> None:
    _need(depth < 16 and isinstance(x, dict) and len(x) == 1, "a layer state is malformed")
    (kind, value), = x.items()
    if kind == "tensor":
        _need(isinstance(value, str), "a layer state names a tensor badly")
    elif kind == "value":
        _need(value is None or isinstance(value, (bool, int, str)) or _num(value), "a layer state holds a bad value")
    elif kind == "items":
        _need(isinstance(value, list), "a layer state is malformed")
        for item in value:
            _skeleton(item, depth + 1)
    else:
        raise SchemaError("a layer state is malformed")


def validate(index: dict[str, Any], version: int) -> None:
    """Check every field an index reader uses (raises SchemaError naming the first bad one)."""
    _dict(index, "the index", ("title", "model", "cache_config", "created", "updated", "sampling", "messages", "tokens", "kv"))
    _need(isinstance(index["title"], str), "title is not text")
    model = _dict(index["model"], "model", ("name", "fingerprint"))
    _need(isinstance(model["name"], str) and isinstance(model["fingerprint"], str), "model is not text")
    _config(index["cache_config"], "cache_config")
    _need(all(_num(index[k]) and 0 <= index[k] < 1e11 for k in ("created", "updated")), "the times are not dates")
    _need(isinstance(index["sampling"], dict), "sampling is not an object")
    _need(isinstance(index["messages"], list), "messages is not a list")
    for m in index["messages"]:
        _dict(m, "a message", ("role", "content"))
        _need(isinstance(m["role"], str) and isinstance(m["content"], str), "a message is not text")
    tokens = index["tokens"]
    _need(isinstance(tokens, list) and (not tokens or (set(map(type, tokens)) == {int} and _uint32s(tokens))),
          "tokens are not token ids")
    kv = _dict(index["kv"], "kv", ("block_tokens", "layers", "blocks", "window", "checkpoint"))
    _need(_int(kv["block_tokens"], 1), "block_tokens")
    if version >= 2:
        _need("dtype" in kv and (kv["dtype"] is None or kv["dtype"] in FLOAT_DTYPES), "kv.dtype is not a float type")
    _need(isinstance(kv["layers"], list), "kv.layers is not a list")
    for i, layer in enumerate(kv["layers"]):
        what = f"layer {i}"
        _dict(layer, what, ("kind", "class"))
        _need(isinstance(layer["class"], str), f"{what} has no class")
        if layer["kind"] == "state":
            _dict(layer, what, ("state",))
            _skeleton(layer["state"])
            continue
        _need(layer["kind"] in ("blocks", "window"), f"{what} has an unknown kind")
        _dict(layer, what, ("config", "offset", "held", "dtype", "fp_tokens"))
        _config(layer["config"], f"{what}'s config")
        _need(_int(layer["offset"]) and _int(layer["held"], 0, layer["offset"]), f"{what} has bad token counts")
        _need(_int(layer["fp_tokens"]), f"{what} has a bad float-head length")
        _need(_int(layer.get("fp_tail", 0), 0, layer["held"]), f"{what} has a bad float-window length")
        _need(layer["dtype"] is None or layer["dtype"] in FLOAT_DTYPES, f"{what} has an unknown dtype")
        _need(layer["dtype"] is not None or layer["offset"] == 0, f"{what} holds tokens but names no dtype")
    _need(isinstance(kv["blocks"], list), "kv.blocks is not a list")
    packs: dict[str, dict[str, Any]] = {}
    if version >= 3:
        _need(isinstance(kv.get("packs"), list), "kv.packs is not a list")
        for p, e in enumerate(kv["packs"]):
            _dict(e, f"pack {p}", ("start", "end"))
            _file_entry(e, f"pack {p}", version)
            _need(_int(e["start"]) and _int(e["end"]) and e["end"] > e["start"] and e["start"] % kv["block_tokens"] == 0,
                  f"pack {p} has a bad token range")
            _need(e["file"] not in packs, f"pack {p} is listed twice")
            packs[e["file"]] = e
    expected = 0
    used: set[str] = set()
    for j, e in enumerate(kv["blocks"]):
        _dict(e, f"block {j}", ("key", "start", "end"))
        if version >= 3:
            _dict(e, f"block {j}", ("file",))
            pack = packs.get(e["file"]) if isinstance(e["file"], str) else None
            _need(pack is not None, f"block {j} names no pack of the index")
            _need(_int(e["start"]) and _int(e["end"]) and pack["start"] <= e["start"] and e["end"] <= pack["end"]
                  and (e["start"] - pack["start"]) % kv["block_tokens"] == 0, f"block {j} lies outside its pack")
            used.add(e["file"])
        else:
            _file_entry(e, f"block {j}", version)
        _need(isinstance(e["key"], str) and bool(_KEY_RE.match(e["key"])), f"block {j} has a bad key")
        _need(_int(e["start"]) and _int(e["end"]) and e["start"] == expected and e["end"] > e["start"], "block ranges")
        _need(e["end"] - e["start"] <= kv["block_tokens"], f"block {j} is longer than a block")
        if version >= 3:
            pack = packs[e["file"]]
            _need(e["end"] - e["start"] == kv["block_tokens"] or e["end"] == pack["end"], f"block {j} ends inside its pack")
        expected = e["end"]
    _need(used == set(packs), "a pack is listed that no block uses")
    if any(layer["kind"] == "blocks" and layer["offset"] for layer in kv["layers"]):
        _need(expected == len(tokens), "the blocks do not cover the tokens")
        _need(all(layer["offset"] == len(tokens) for layer in kv["layers"] if layer["kind"] == "blocks"),
              "a layer holds another number of tokens than the chat")
    if kv["window"] is not None:
        _file_entry(kv["window"], "the window snapshot", version)
    cp = kv["checkpoint"]
    if cp is not None:
        _dict(cp, "the checkpoint", ("position", "offsets"))
        _file_entry(cp, "the checkpoint", version, nullable_file=True)
        _need(_int(cp["position"], 0, len(tokens)), "the checkpoint's position")
        _need(isinstance(cp["offsets"], list) and len(cp["offsets"]) == len(kv["layers"])
              and all(_int(o) for o in cp["offsets"]), "the checkpoint's offsets")


def parse_index(name: str, raw: bytes, path: object) -> tuple[dict[str, Any], int]:
    """(verified index, format version) of session `name` from its file's bytes: format, version, checksum, schema.

    Raises SessionCorrupt with one sentence for anything else.
    """
    from .errors import SessionCorrupt, corrupt

    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt(name, "its index is not valid JSON, probably truncated or overwritten") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise SessionCorrupt(
            f"The index of session {name!r} is not a kvchat session file: "
            f"move {path} away or remove it with 'kvchat sessions rm {name}'."
        )
    version = obj.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise SessionCorrupt(
            f"Session {name!r} uses session format version {version!r} but this kvchat reads only "
            f"versions {readable}: open it with the kvchat that wrote it, or upgrade kvchat."
        )
    body = dict(obj)
    checksum = body.pop("checksum", None)
    try:
        ok = checksum_ok(version, checksum, body, raw)
    except ValueError:  # NaN or Infinity in the JSON: not canonical, so not ours
        ok = False
    if not ok:
        raise corrupt(name, "its index fails its checksum")
    try:
        validate(body, version)
    except SchemaError as e:
        raise corrupt(name, f"its index is malformed: {e}") from None
    return body, version


# -- values read from an index ------------------------------------------------------------


@dataclass(frozen=True)
class SessionMeta:
    """What listing a session shows, read from its index alone."""

    name: str
    title: str
    model_name: str
    model_fingerprint: str
    cache_config: CacheConfig
    tokens: int  # token ids whose keys and values the session holds
    bytes_on_disk: int  # index plus every file it references (shared blocks counted in full)
    created: float  # seconds since the epoch
    updated: float
    kv_dtype: str | None = None  # the float type the KV was computed in (None: nothing stored yet)
    kv_bytes: int = 0  # bytes of KV files: what loading it reads
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "cache": self.cache_config.label(),
            "cache_config": self.cache_config.to_dict(),
            "tokens": self.tokens,
            "bytes_on_disk": self.bytes_on_disk,
            "kv_dtype": self.kv_dtype,
            "format_version": self.version,
            "created": self.created,
            "updated": self.updated,
        }


def kv_dtype_of(index: dict[str, Any]) -> str | None:
    """The session's float type: v2 records it; for v1, the dtype of its layers."""
    kv = index["kv"]
    if kv.get("dtype"):
        return kv["dtype"]
    for layer in kv["layers"]:
        if layer.get("dtype"):
            return layer["dtype"]
    return None


def meta_of(name: str, index: dict[str, Any], index_bytes_len: int, version: int) -> SessionMeta:
    kv_bytes = sum(e["bytes"] for e in file_entries(index))
    return SessionMeta(
        name=name,
        title=index["title"],
        model_name=index["model"]["name"],
        model_fingerprint=index["model"]["fingerprint"],
        cache_config=CacheConfig.from_dict(index["cache_config"]),
        tokens=len(index["tokens"]),
        bytes_on_disk=index_bytes_len + kv_bytes,
        created=float(index["created"]),
        updated=float(index["updated"]),
        kv_dtype=kv_dtype_of(index),
        kv_bytes=kv_bytes,
        version=version,
    )


@dataclass
class SessionData:
    """A session's contents; `checkpoint` is filled by :meth:`SessionStore.load` only.

    ``checkpoint`` is the engine's (position, per-layer checkpoints) at the end of
    the last prompt, for caches with a rotating window: with it, a resumed chat
    whose next prompt diverges inside the last answer goes back exactly as the
    uninterrupted chat would, instead of re-prefilling from the start.
    ``converted_from`` names the float type the stored KV had when the load
    converted it to the one asked for (None: loaded as stored).
    """

    meta: SessionMeta
    messages: list[dict[str, Any]]
    tokens: list[int]
    sampling: dict[str, Any]
    checkpoint: tuple[int, list[Any]] | None = None
    converted_from: str | None = None
    # (verified index, format version) as read: `SessionStore.load(read=...)` starts from it
    verified: tuple[dict[str, Any], int] | None = field(default=None, repr=False, compare=False)

