"""Packs (format v3): a save's blocks in one file, shared by key, freed when no index names them, never pinning dead KV."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlx.core as mx
import pytest
import xxhash

from mlx_cache import CacheConfig, FullKVCache
from mlx_cache.store import SessionCorrupt, SessionStore
from mlx_cache.store.index import BLOCK_TOKENS

CONFIG = CacheConfig()
N = 8 * BLOCK_TOKENS  # a first save of 8 full blocks


@pytest.fixture(scope="module")
def kv() -> tuple[mx.array, mx.array]:
    mx.random.seed(11)
    k = mx.random.normal((1, 2, N + 300, 16)).astype(mx.float16)
    v = mx.random.normal((1, 2, N + 300, 16)).astype(mx.float16)
    mx.eval(k, v)
    return k, v


def caches_of(kv, n: int, layers: int = 2, bump_from: int | None = None) -> list[FullKVCache]:
    """Caches holding the first `n` tokens of `kv`; from `bump_from` on, other values (as another prompt gives)."""
    k, v = kv
    out = []
    for i in range(layers):
        c = FullKVCache(CONFIG)
        kk, vv = k[..., :n, :] + i, v[..., :n, :] - i
        if bump_from is not None:
            kk = mx.concatenate([kk[..., :bump_from, :], kk[..., bump_from:, :] + 1], axis=2)
        c.update_and_fetch(kk, vv)
        out.append(c)
    return out


def save(store: SessionStore, name: str, tokens: list[int], caches) -> dict:
    store.save(name, messages=[], tokens=tokens, caches=caches, cache_config=CONFIG, model_name="m",
               model_fingerprint="f", sampling={}, title=name)
    return store.index(name)[0]


def loads_as(store: SessionStore, name: str, caches) -> bool:
    fresh = [FullKVCache(CONFIG) for _ in caches]
    store.load(name, fresh)
    return all(a.offset == b.offset and all(mx.array_equal(p, q).item() for p, q in
                                            zip(a.temporal_planes()[0] + a.temporal_planes()[1],
                                                b.temporal_planes()[0] + b.temporal_planes()[1]))
               for a, b in zip(caches, fresh))


def packs(index: dict) -> dict[str, tuple[int, int]]:
    return {p["file"]: (p["start"], p["end"]) for p in index["kv"]["packs"]}


def kv_files(store: SessionStore) -> set[str]:
    return {p.name for p in store.blocks_dir.iterdir() if p.suffix == ".safetensors"}


def test_a_first_save_is_one_pack_and_a_tail(kv, tmp_path):
    store = SessionStore(tmp_path)
    tokens = list(range(N + 100))
    caches = caches_of(kv, N + 100)
    index = save(store, "a", tokens, caches)
    assert sorted(packs(index).values()) == [(0, N), (N, N + 100)]
    assert kv_files(store) == set(packs(index))
    assert {b["file"] for b in index["kv"]["blocks"][:8]} == {index["kv"]["blocks"][0]["key"] + ".safetensors"}
    assert loads_as(store, "a", caches)


def test_a_session_shares_the_leading_blocks_of_another_sessions_pack(kv, tmp_path):
    store = SessionStore(tmp_path)
    a = save(store, "a", list(range(N)), caches_of(kv, N))
    (pack,) = packs(a)
    b_caches = caches_of(kv, 6 * BLOCK_TOKENS + 40)
    b = save(store, "b", list(range(6 * BLOCK_TOKENS + 40)), b_caches)
    assert [e["file"] for e in b["kv"]["blocks"][:6]] == [pack] * 6  # compared byte for byte, then shared
    assert loads_as(store, "b", b_caches)
    # the same tokens computed with other bytes are never passed off as the stored ones
    c_caches = caches_of(kv, 6 * BLOCK_TOKENS, bump_from=5 * BLOCK_TOKENS + 7)
    c = save(store, "c", list(range(6 * BLOCK_TOKENS)), c_caches)
    (own,) = packs(c)
    assert own != pack and own.startswith(a["kv"]["blocks"][0]["key"] + "-")
    assert loads_as(store, "c", c_caches) and loads_as(store, "b", b_caches)
    # a session using less than half of a pack writes its own copy instead of keeping the pack alive
    d = save(store, "d", list(range(2 * BLOCK_TOKENS)), caches_of(kv, 2 * BLOCK_TOKENS))
    assert pack not in packs(d)


def test_an_edit_keeps_a_mostly_used_pack_and_rewrites_a_mostly_dead_one(kv, tmp_path):
    store = SessionStore(tmp_path)
    tokens = list(range(N))
    first = save(store, "s", tokens, caches_of(kv, N))
    (pack,) = packs(first)
    # an edit in block 6: blocks 0-5 (75% of the pack) stay where they are
    edited = tokens[: 6 * BLOCK_TOKENS + 3] + [7] * (N - 6 * BLOCK_TOKENS - 3)
    caches = caches_of(kv, N, bump_from=6 * BLOCK_TOKENS + 3)
    index = save(store, "s", edited, caches)
    assert [e["file"] for e in index["kv"]["blocks"][:6]] == [pack] * 6 and len(packs(index)) == 2
    assert pack in kv_files(store) and loads_as(store, "s", caches)
    store.fork("s", "fork")
    # an edit in block 2: the pack would be 3/4 dead, so blocks 0-1 move into the new pack
    edited = tokens[: 2 * BLOCK_TOKENS + 3] + [9] * (N - 2 * BLOCK_TOKENS - 3)
    caches2 = caches_of(kv, N, bump_from=2 * BLOCK_TOKENS + 3)
    index = save(store, "s", edited, caches2)
    assert pack not in packs(index) and sorted(packs(index).values()) == [(0, N)]
    assert pack in kv_files(store)  # the fork still names it
    assert loads_as(store, "s", caches2) and loads_as(store, "fork", caches)
    store.remove("fork")
    assert pack not in kv_files(store)  # freed once no index names any block in it
    assert kv_files(store) == set(packs(index))


def test_rm_frees_a_shared_pack_with_its_last_user(kv, tmp_path):
    store = SessionStore(tmp_path)
    a = save(store, "a", list(range(N)), caches_of(kv, N))
    b = save(store, "b", list(range(7 * BLOCK_TOKENS)), caches_of(kv, 7 * BLOCK_TOKENS))
    (pack,) = packs(a)
    assert set(packs(b)) == {pack}
    assert store.remove("a") == (0, 0)  # b uses it
    assert loads_as(store, "b", caches_of(kv, 7 * BLOCK_TOKENS))
    size = (store.blocks_dir / pack).stat().st_size
    assert store.remove("b") == (1, size) and kv_files(store) == set()


def test_a_flip_in_the_part_of_a_pack_a_session_does_not_use_is_still_refused(kv, tmp_path):
    store = SessionStore(tmp_path)
    a = save(store, "a", list(range(N)), caches_of(kv, N))
    save(store, "b", list(range(5 * BLOCK_TOKENS)), caches_of(kv, 5 * BLOCK_TOKENS))
    path = store.blocks_dir / next(iter(packs(a)))
    data = bytearray(path.read_bytes())
    data[-3] ^= 4  # the last tokens of the last plane: only a reads them
    path.write_bytes(bytes(data))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for name in ("a", "b"):
        with pytest.raises(SessionCorrupt):
            store.load(name, [FullKVCache(CONFIG) for _ in range(2)])
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == before


def _each_flip_is_refused(store: SessionStore, name: str, path: Path, positions: list[int], layers: int) -> None:
    for pos in positions:
        data = bytearray(path.read_bytes())
        data[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(SessionCorrupt):
            store.load(name, [FullKVCache(CONFIG) for _ in range(layers)])
        data[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(data))


def test_the_segmented_checksum_is_the_xxh3_of_each_mib_s_xxh3_and_catches_a_flip_in_any_segment(kv, tmp_path):
    store = SessionStore(tmp_path)
    caches = caches_of(kv, N, layers=12)
    entry = save(store, "a", list(range(N)), caches)["kv"]["packs"][0]
    path = store.blocks_dir / entry["file"]
    data = path.read_bytes()
    seg = 1 << 20
    assert len(data) > 2 * seg  # three segments, the last one short
    # the definition in docs/session-format.md, computed here with xxhash alone
    want = xxhash.xxh3_128_hexdigest(b"".join(xxhash.xxh3_128_digest(data[i:i + seg]) for i in range(0, len(data), seg)))
    assert entry["xxh3_128_mib"] == want
    assert "xxh3_128" not in entry and "sha256" not in entry
    # the header, both sides of each segment boundary, the last byte
    _each_flip_is_refused(store, "a", path, [3, 200, seg - 1, seg, 2 * seg - 1, 2 * seg, len(data) - 1], 12)
    assert loads_as(store, "a", caches)


def test_a_pack_read_by_two_threads_a_segment_at_a_time_loads_bitwise(kv, tmp_path, monkeypatch):
    from mlx_cache.store import checksum

    monkeypatch.setattr(checksum, "SEGMENT", 4096)  # many segments, so both threads take some, for save and load
    store = SessionStore(tmp_path)
    caches = caches_of(kv, N + 100)
    index = save(store, "a", list(range(N + 100)), caches)
    assert loads_as(store, "a", caches)
    path = store.blocks_dir / index["kv"]["packs"][0]["file"]
    size = path.stat().st_size
    assert size > 50 * 4096
    _each_flip_is_refused(store, "a", path, [size // 4, size // 2 + 1, 4095, 4096, size - 1], 2)
    assert loads_as(store, "a", caches)


def test_a_v3_pack_read_by_two_threads_while_a_third_hashes_loads_bitwise(kv, tmp_path, monkeypatch):
    from mlx_cache.store import reading
    from store_v3_writer import write_v3

    monkeypatch.setattr(reading, "_PARALLEL", 1)  # every file takes the path of v3 packs over 16 MiB
    monkeypatch.setattr(reading, "_CHUNK", 4096)  # in many chunks, so both readers take some
    caches = caches_of(kv, N + 100)
    write_v3(tmp_path, "a", messages=[], tokens=list(range(N + 100)), caches=caches, cache_config=CONFIG,
             model_name="m", model_fingerprint="f", sampling={}, title="a")
    store = SessionStore(tmp_path)
    index, version = store.index("a")
    assert version == 3 and all("xxh3_128" in p for p in index["kv"]["packs"])
    assert loads_as(store, "a", caches)
    path = store.blocks_dir / index["kv"]["packs"][0]["file"]
    size = path.stat().st_size
    _each_flip_is_refused(store, "a", path, [size // 4, size // 2 + 1, size - 1], 2)  # each half of the scatter, the end
    assert loads_as(store, "a", caches)


@pytest.mark.parametrize("keep_fp", [300, 2000])
def test_a_quantized_session_with_a_float_head_shares_part_of_a_pack_bitwise(tmp_path, keep_fp):
    """q4 with keep_fp: the float head covers a pack's leading tokens, or more than the session takes from it."""
    config = CacheConfig(k_bits=4, v_bits=4, keep_fp=keep_fp)
    mx.random.seed(12)
    k = mx.random.normal((1, 2, N, 64)).astype(mx.float16)  # group 64 needs heads of 64
    v = mx.random.normal((1, 2, N, 64)).astype(mx.float16)

    def q4(n: int) -> list[FullKVCache]:
        out = []
        for i in range(2):
            c = FullKVCache(config)
            for lo in range(0, n, 512):  # in prefill-sized chunks, the same for every session
                hi = min(n, lo + 512)
                c.update_and_fetch(k[..., lo:hi, :] + i, v[..., lo:hi, :])
            out.append(c)
        return out

    def put(name: str, n: int) -> dict:
        store.save(name, messages=[], tokens=list(range(n)), caches=q4(n), cache_config=config, model_name="m",
                   model_fingerprint="f", sampling={}, title=name)
        return store.index(name)[0]

    def same(name: str, n: int) -> bool:
        fresh = [FullKVCache(config) for _ in range(2)]
        store.load(name, fresh)
        return all(all(mx.array_equal(p, q).item() for p, q in zip(
            a.temporal_planes()[0] + a.temporal_planes()[1] + a.float_head(),
            b.temporal_planes()[0] + b.temporal_planes()[1] + b.float_head())) for a, b in zip(q4(n), fresh))

    store = SessionStore(tmp_path)
    a = put("a", N)
    b = put("b", 5 * BLOCK_TOKENS + 9)
    assert b["kv"]["blocks"][0]["file"] == a["kv"]["packs"][0]["file"]  # 5 of its 8 blocks: shared
    assert same("a", N) and same("b", 5 * BLOCK_TOKENS + 9)


def test_headers_that_differ_only_in_metadata_are_parsed_once_and_each_keeps_its_own_metadata():
    from mlx_cache.store import tensorfile

    arrays = {"0.k.0": mx.zeros((1, 2, 256, 16), mx.float16), "0.v.0": mx.ones((1, 2, 256, 16), mx.float16)}

    def head(metadata: dict) -> tuple[bytes, int]:
        buffers = tensorfile.encode(arrays, metadata)
        return bytes(buffers[0]), tensorfile.size_of(buffers)

    cache = tensorfile.HeaderCache()
    first = cache.parse(*head({"format": "kvchat-pack", "start": "256", "keys": "a"}))
    again = cache.parse(*head({"format": "kvchat-pack", "start": "512", "keys": "b"}))
    assert again.tensors is first.tensors  # looked up, not parsed again
    assert again.metadata == {"format": "kvchat-pack", "start": "512", "keys": "b"}
    braced = cache.parse(*head({"format": "kvchat-pack", "start": "512", "keys": "c}d"}))
    assert braced.metadata["keys"] == "c}d"  # a brace inside a value: parsed whole, still right
    wider = cache.parse(*head({"format": "kvchat-pack", "start": "123456789012", "keys": "e" * 40}))
    direct = tensorfile.parse_header(*head({"format": "kvchat-pack", "start": "123456789012", "keys": "e" * 40}))
    assert (wider.size, wider.tensors) == (direct.size, direct.tensors)  # a longer header moves the tensors


def test_a_chat_saved_turn_by_turn_loads_bitwise_with_every_packs_segments_in_one_queue(kv, tmp_path, monkeypatch):
    from mlx_cache.store import checksum, packs as packs_module

    monkeypatch.setattr(packs_module, "MERGE_BYTES", 0)  # a pack per save: many packs to read at once
    monkeypatch.setattr(checksum, "SEGMENT", 4096)  # hundreds of segments over many packs: races would show
    store = SessionStore(tmp_path)
    for n in range(300, N + 1, 300):  # a pack per save, and a tail
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert len(index["kv"]["packs"]) >= 6
    caches = caches_of(kv, index["kv"]["blocks"][-1]["end"])
    for _ in range(20):
        assert loads_as(store, "a", caches)
    path = store.blocks_dir / index["kv"]["packs"][3]["file"]
    _each_flip_is_refused(store, "a", path, [path.stat().st_size // 2], 2)  # a pack in the middle


def test_a_header_whose_metadata_is_not_an_object_is_never_served_from_the_cache():
    import json
    import struct

    from mlx_cache.store import tensorfile

    def head(meta: str, tensors: dict) -> tuple[bytes, int]:
        body = ('{"__metadata__":' + meta + "," + json.dumps(tensors, separators=(",", ":"))[1:]).encode()
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body, 8 + len(body) + 64

    u = {"u": {"dtype": "F16", "shape": [32], "data_offsets": [0, 64]}}
    cache = tensorfile.HeaderCache()
    # '{"__metadata__":null,"t":{...},"u":...': the first "}" closes t's entry, not the metadata, so what
    # follows it is the same bytes as in a header with real metadata and no t
    odd = 'null,"t":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}'
    first = cache.parse(*head(odd, u))
    assert set(first.tensors) == {"t", "u"}
    value = "b" * (len(odd) - len('{"a":""}'))  # the same length: the same length prefix and file size
    real = cache.parse(*head('{"a":"' + value + '"}', u))
    assert real.metadata == {"a": value} and set(real.tensors) == {"u"}


def test_buffers_are_cut_into_runs_of_exactly_the_chunk_size_in_order():
    import random

    from mlx_cache.store.reading import _chunks

    rng = random.Random(1)
    for _ in range(2000):
        iov = [memoryview(rng.randbytes(rng.choice([0, 1, 3, 7, 16, 40]))) for _ in range(rng.randint(0, 12))]
        chunk = rng.choice([1, 2, 5, 8, 16, 33])
        runs = [b"".join(bytes(b) for b in run) for run in _chunks(iov, chunk)]
        assert b"".join(runs) == b"".join(bytes(b) for b in iov)
        assert all(len(r) == chunk for r in runs[:-1]) and (not runs or 0 < len(runs[-1]) <= chunk)


def test_with_two_damaged_packs_the_error_names_the_first_in_token_order(kv, tmp_path, monkeypatch):
    from mlx_cache.store import checksum, packs as packs_module

    monkeypatch.setattr(packs_module, "MERGE_BYTES", 0)  # a pack per save
    monkeypatch.setattr(checksum, "SEGMENT", 4096)
    store = SessionStore(tmp_path)
    for n in range(300, N + 1, 300):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    files = [p["file"] for p in index["kv"]["packs"]]
    for f in (files[4], files[1]):  # the later one damaged too, and first
        path = store.blocks_dir / f
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 8
        path.write_bytes(bytes(data))
    for _ in range(5):
        with pytest.raises(SessionCorrupt, match=files[1].split(".")[0]):
            store.load("a", [FullKVCache(CONFIG) for _ in range(2)])


def pack_blocks(index: dict) -> list[int | str]:
    """Each pack's length in blocks, in token order ("t" for a partial tail)."""
    out: list[int | str] = []
    for p in index["kv"]["packs"]:
        n = p["end"] - p["start"]
        out.append(n // BLOCK_TOKENS if n % BLOCK_TOKENS == 0 else "t")
    return out


def test_a_chat_saved_a_little_at_a_time_merges_its_small_packs_like_a_binary_counter(kv, tmp_path):
    store = SessionStore(tmp_path)
    for n in range(100, N + 1, 100):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
        full = n // BLOCK_TOKENS
        want = [1 << b for b in range(full.bit_length() - 1, -1, -1) if full >> b & 1]
        assert pack_blocks(index) == want + (["t"] if n % BLOCK_TOKENS else []), n
        assert kv_files(store) == set(packs(index))  # the packs it merged are gone
        assert loads_as(store, "a", caches_of(kv, n))
    # a save that adds several blocks at once merges what is no bigger than those
    n = N + 300
    index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert pack_blocks(index) == [9, "t"] and loads_as(store, "a", caches_of(kv, n))


def test_no_merge_makes_a_pack_over_the_limit(kv, tmp_path, monkeypatch):
    from mlx_cache.store import packs as packs_module

    store = SessionStore(tmp_path)
    one = save(store, "a", list(range(BLOCK_TOKENS)), caches_of(kv, BLOCK_TOKENS))["kv"]["packs"][0]["bytes"]
    monkeypatch.setattr(packs_module, "MERGE_BYTES", 2 * one + one // 2)  # two blocks fit, three do not
    for n in range(2 * BLOCK_TOKENS, N + 1, BLOCK_TOKENS):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert pack_blocks(index) == [2, 2, 2, 2]
    assert all(p["bytes"] <= 2 * one + one // 2 for p in index["kv"]["packs"])
    assert kv_files(store) == set(packs(index)) and loads_as(store, "a", caches_of(kv, N))


def test_merging_never_touches_the_packs_a_fork_still_names(kv, tmp_path):
    store = SessionStore(tmp_path)
    for n in (BLOCK_TOKENS, 2 * BLOCK_TOKENS, 3 * BLOCK_TOKENS + 50):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert pack_blocks(index) == [2, 1, "t"]
    store.fork("a", "b")
    forked = {f for f, (s, e) in packs(index).items() if (e - s) % BLOCK_TOKENS == 0}
    grown = save(store, "a", list(range(4 * BLOCK_TOKENS)), caches_of(kv, 4 * BLOCK_TOKENS))
    assert pack_blocks(grown) == [2, 1, 1] and forked <= set(packs(grown))  # shared, not copied
    assert loads_as(store, "b", caches_of(kv, 3 * BLOCK_TOKENS + 50)) and loads_as(store, "a", caches_of(kv, 4 * BLOCK_TOKENS))
    store.remove("b")
    n = 5 * BLOCK_TOKENS
    grown = save(store, "a", list(range(n)), caches_of(kv, n))  # the fork gone, its packs are ours to merge
    assert pack_blocks(grown) == [5] and kv_files(store) == set(packs(grown)) and loads_as(store, "a", caches_of(kv, n))


def test_a_merged_pack_under_a_hashed_name_is_still_shared_by_a_new_session(kv, tmp_path):
    store = SessionStore(tmp_path)
    for n in range(128, N + 1, 128):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    (pack,) = packs(index)
    assert "-" in pack  # merged while the plain name was its predecessor's
    b = save(store, "b", list(range(N + 40)), caches_of(kv, N + 40))
    assert [e["file"] for e in b["kv"]["blocks"][:8]] == [pack] * 8
    assert loads_as(store, "b", caches_of(kv, N + 40)) and loads_as(store, "a", caches_of(kv, N))


def test_packs_a_merge_drops_while_another_process_is_in_the_store_go_at_the_next_save(kv, tmp_path):
    store = SessionStore(tmp_path)
    save(store, "a", list(range(BLOCK_TOKENS)), caches_of(kv, BLOCK_TOKENS))
    other = SessionStore(tmp_path).store_lock()  # another kvchat, mid-load: no file may go now
    try:
        index = save(store, "a", list(range(2 * BLOCK_TOKENS)), caches_of(kv, 2 * BLOCK_TOKENS))
        assert pack_blocks(index) == [2] and len(kv_files(store)) == 2
    finally:
        other.release()
    n = 2 * BLOCK_TOKENS + 20
    index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert kv_files(store) == set(packs(index)) and loads_as(store, "a", caches_of(kv, n))


def test_blocks_from_where_the_caches_were_trimmed_are_written_again_even_with_the_same_tokens(tmp_path):
    config = CacheConfig(k_bits=4, v_bits=3, keep_fp=4, fp_window=96, k_per_channel=True)  # kv4's levers
    mx.random.seed(5)
    k = mx.random.normal((1, 2, 640, 64)).astype(mx.float16)
    v = mx.random.normal((1, 2, 640, 64)).astype(mx.float16)

    def feed(caches, start: int, end: int) -> None:
        for s in range(start, end, 64):
            e = min(end, s + 64)
            for c in caches:
                c.update_and_fetch(k[..., s:e, :], v[..., s:e, :])

    def state(c) -> list[mx.array]:
        a, b = c.temporal_planes()
        return [*a, *b, *(c.float_head() or ()), *c.extras().get("tail", ())]

    def resumes(store: SessionStore, caches) -> bool:
        fresh = [FullKVCache(config) for _ in caches]
        store.load("a", fresh)
        return all(all(mx.array_equal(p, q).item() for p, q in zip(state(x), state(y))) for x, y in zip(caches, fresh))

    tokens = list(range(600))
    for changed_from, expect in ((150, True), (None, False)):
        store = SessionStore(tmp_path / str(changed_from))
        caches = [FullKVCache(config) for _ in range(2)]
        feed(caches, 0, 600)
        store.save("a", messages=[], tokens=tokens, caches=caches, cache_config=config, model_name="m",
                   model_fingerprint="f", sampling={}, title="a")
        for c in caches:
            c.trim_to(150)  # back into a key group: its codes are made again when it refills
        feed(caches, 150, 600)  # the very same tokens and values
        store.save("a", messages=[], tokens=tokens, caches=caches, cache_config=config, model_name="m",
                   model_fingerprint="f", sampling={}, title="a", changed_from=changed_from)
        assert resumes(store, caches) is expect  # without the mark, the blocks kept by key hold the old codes


def test_packs_to_merge_takes_packs_no_bigger_than_the_run_so_far_within_the_limit():
    from mlx_cache.store.packs import packs_to_merge

    assert packs_to_merge(256, []) == 0
    assert packs_to_merge(256, [(256, 10), (512, 20), (1024, 40)]) == 3  # 256 <= 256, 512 <= 512, 1024 <= 1024
    assert packs_to_merge(256, [(512, 20), (256, 10)]) == 0  # the nearest is bigger than the run
    assert packs_to_merge(256, [(256, 10), (1024, 40)]) == 1
    assert packs_to_merge(256, [(256, 10), (512, 20)], limit=25) == 1  # 10 + 10 fit, 10 + 10 + 20 do not
    assert packs_to_merge(256, [(256, 10)], limit=15) == 0


def test_a_merging_save_failing_at_any_step_leaves_the_last_save_opening_bitwise(kv, tmp_path):
    """The crash test of test_store_format, on a save that rewrites two packs as one."""
    import shutil

    from mlx_cache.store import StoreError, durable

    template = SessionStore(tmp_path / "template")
    save(template, "a", list(range(BLOCK_TOKENS)), caches_of(kv, BLOCK_TOKENS))
    before = save(template, "a", list(range(BLOCK_TOKENS + 60)), caches_of(kv, BLOCK_TOKENS + 60))
    assert pack_blocks(before) == [1, "t"]
    n = 2 * BLOCK_TOKENS + 30
    durable.count_operations()
    probe = SessionStore(tmp_path / "probe")
    shutil.copytree(template.root, probe.root)
    assert pack_blocks(save(probe, "a", list(range(n)), caches_of(kv, n))) == [2, "t"]
    ops = durable.operations_seen()
    durable.fail_on(None)
    assert {"write", "fsync", "link", "rename"} <= {what for what, _, _ in ops}
    for k, op in enumerate(ops):
        st = SessionStore(tmp_path / f"crash-{k}")
        shutil.copytree(template.root, st.root)
        durable.fail_on(op)
        try:
            save(st, "a", list(range(n)), caches_of(kv, n))
            failed = False
        except StoreError:
            failed = True
        finally:
            durable.fail_on(None)
        tokens = len(st.index("a")[0]["tokens"])
        assert tokens == n or failed, op
        assert loads_as(st, "a", caches_of(kv, tokens)), op
        save(st, "a", list(range(n)), caches_of(kv, n))  # and the next save goes through
        assert loads_as(st, "a", caches_of(kv, n)), op


def test_an_index_like_file_that_cannot_be_read_stops_merges_not_saves(kv, tmp_path):
    import os

    store = SessionStore(tmp_path)
    save(store, "a", list(range(BLOCK_TOKENS)), caches_of(kv, BLOCK_TOKENS))
    os.symlink("loop.json", store.sessions_dir / "loop.json")  # unreadable (ELOOP): what it names is unknown
    index = save(store, "a", list(range(2 * BLOCK_TOKENS)), caches_of(kv, 2 * BLOCK_TOKENS))
    assert pack_blocks(index) == [1, 1] and loads_as(store, "a", caches_of(kv, 2 * BLOCK_TOKENS))
    (store.sessions_dir / "loop.json").unlink()
    index = save(store, "a", list(range(3 * BLOCK_TOKENS)), caches_of(kv, 3 * BLOCK_TOKENS))
    assert pack_blocks(index) == [3] and loads_as(store, "a", caches_of(kv, 3 * BLOCK_TOKENS))


def test_a_pack_cut_by_a_regenerate_is_merged_whole_instead_of_keeping_its_dead_half(kv, tmp_path):
    store = SessionStore(tmp_path)
    for n in (BLOCK_TOKENS, 2 * BLOCK_TOKENS + 40):
        index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert pack_blocks(index) == [2, "t"]
    # back into block 1 and the same tokens again: blocks 1 on are written again, block 0 with them
    store.save("a", messages=[], tokens=list(range(n)), caches=caches_of(kv, n), cache_config=CONFIG, model_name="m",
               model_fingerprint="f", sampling={}, title="a", changed_from=BLOCK_TOKENS + 10)
    index = store.index("a")[0]
    assert pack_blocks(index) == [2, "t"] and kv_files(store) == set(packs(index))  # no pack half dead
    assert loads_as(store, "a", caches_of(kv, n))


def test_a_half_dead_pack_further_back_is_merged_too(kv, tmp_path, monkeypatch):
    from mlx_cache.store import packs as packs_module

    store = SessionStore(tmp_path)
    monkeypatch.setattr(packs_module, "MERGE_BYTES", 0)  # first a chat whose regenerate left a pack half used
    save(store, "a", list(range(2 * BLOCK_TOKENS)), caches_of(kv, 2 * BLOCK_TOKENS))
    n = 3 * BLOCK_TOKENS
    store.save("a", messages=[], tokens=list(range(n)), caches=caches_of(kv, n), cache_config=CONFIG, model_name="m",
               model_fingerprint="f", sampling={}, title="a", changed_from=BLOCK_TOKENS + 10)
    index = store.index("a")[0]
    assert [(p["start"], p["end"]) for p in index["kv"]["packs"]] == [(0, 2 * BLOCK_TOKENS), (BLOCK_TOKENS, n)]
    monkeypatch.undo()
    n = 5 * BLOCK_TOKENS  # two new blocks: they take the 2-block pack, then what is left of the half-dead one
    index = save(store, "a", list(range(n)), caches_of(kv, n))
    assert pack_blocks(index) == [5] and kv_files(store) == set(packs(index)) and loads_as(store, "a", caches_of(kv, n))
