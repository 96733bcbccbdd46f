"""The session format on disk: v1 sessions keep opening, every bit is verified, a failed save loses nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig, FullKVCache, make_layer_cache
from mlx_cache.store import SessionCorrupt, SessionStore, StoreError
from mlx_cache.store import durable
from mlx_cache.store.index import canonical_json
from models.chat import Chat
from models.engine import Engine, Finished
from models.sample import GREEDY

from store_v1_writer import write_v1
from store_v2_writer import write_v2
from store_v3_writer import write_v3

SAMPLING = GREEDY.with_(max_tokens=6)
LONG = "Answer in the voice of a patient teacher who explains every step. " * 9  # more than two blocks of tokens


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["llama"])


def turn(chat: Chat, text: str) -> Finished:
    return [e for e in chat.send(text) if isinstance(e, Finished)][-1]


def planes(c) -> list[mx.array]:
    k, v = c.temporal_planes()
    head = c.float_head() or ()
    return [*k, *v, *head]


def same_caches(a, b) -> bool:
    return all(x.offset == y.offset and all(mx.array_equal(p, q).item() for p, q in zip(planes(x), planes(y)))
               for x, y in zip(a, b))


def next_logits(engine, caches, tokens) -> mx.array:
    out = engine.model(mx.array(tokens)[None], cache=caches)[0, -1]
    mx.eval(out)
    return out


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


CONFIGS = {
    "full": CacheConfig(),
    "q4-float-head": CacheConfig(k_bits=4, v_bits=4, keep_fp=16),
    "rotating-q8": CacheConfig(kind="rotating", window=32, sinks=4, k_bits=8, v_bits=8),
}


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_v1_v2_and_v3_sessions_open_bitwise_and_move_to_v4_on_the_next_save(engine, tmp_path, kind, version):
    config = CONFIGS[kind]
    live = Chat(engine, config, SAMPLING)
    live.set_system(LONG) if config.kind == "full" else None
    turn(live, "Hello there, how are you doing today my friend?")
    root = tmp_path / "home"
    {1: write_v1, 2: write_v2, 3: write_v3}[version](root, "old", messages=live.messages, tokens=live.state.tokens, caches=live.state.caches,
             cache_config=config, model_name=engine.loaded.name, model_fingerprint=engine.loaded.fingerprint,
             sampling=SAMPLING.to_dict(), title="old")
    store = SessionStore(root)
    v1_files = digests(root)
    assert json.loads((root / "sessions" / "old.json").read_text())["version"] == version

    resumed = Chat.open(engine, store, "old", sampling=SAMPLING)
    assert resumed.state.tokens == live.state.tokens and same_caches(live.state.caches, resumed.state.caches)
    follow = engine.encode(live.messages + [{"role": "user", "content": "And then?"}])[len(live.state.tokens):]
    assert mx.array_equal(next_logits(engine, live.state.caches, follow), next_logits(engine, resumed.state.caches, follow)).item()
    resumed.close()
    assert digests(root) == v1_files  # opening changes nothing

    resumed = Chat.open(engine, store, "old", sampling=SAMPLING)
    turn(resumed, "Tell me more.")
    resumed.close()
    index = json.loads((root / "sessions" / "old.json").read_text())
    assert index["version"] == 4 and index["checksum"].startswith("xxh3_128:")
    if config.kind == "full":
        kept = [e for e in index["kv"]["packs"] if f"blocks/{e['file']}" in v1_files]
        assert kept and all(e["end"] - e["start"] == 256 or version == 3 for e in kept)  # unchanged old files are kept
        # with the checksum they were written with
        assert all(("sha256" if version == 1 else "xxh3_128") in e for e in kept)
        new = [e for e in index["kv"]["packs"] if e not in kept]
        assert new and all(e["file"] not in v1_files and "xxh3_128_mib" in e for e in new)
    again = Chat.open(engine, store, "old", sampling=SAMPLING)
    assert same_caches(resumed.state.caches, again.state.caches)
    again.close()


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << (pos % 8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["full", "rotating-q8"])
def test_a_one_bit_flip_anywhere_in_any_file_is_refused_and_left_alone(engine, tmp_path, kind):
    config = CONFIGS[kind]
    store = SessionStore(tmp_path / "home")
    chat = Chat.open(engine, store, "s", cache_config=config, sampling=SAMPLING)
    if config.kind == "full":
        chat.set_system(LONG)
    turn(chat, "Hello there")
    chat.close()
    files = sorted(p for p in store.root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors"))
    assert len(files) >= 2
    from mlx_cache.store.index import file_entries

    named = {e["file"] for e in file_entries(json.loads((store.sessions_dir / "s.json").read_text()))}
    assert {p.name for p in files if p.suffix == ".safetensors"} == named  # a save leaves no file behind that it replaced
    for path in files:
        size = path.stat().st_size
        # every byte of the header region, then positions spread over the data
        positions = sorted(set(range(min(size, 200))) | set(range(0, size, max(1, size // 97))) | {size - 1})
        for pos in positions[:: max(1, len(positions) // 150)]:
            _flip(path, pos)
            before = digests(store.root)
            caches = [make_layer_cache(config) for _ in range(len(chat.state.caches))]
            with pytest.raises(SessionCorrupt):
                store.load("s", caches)
                pytest.fail(f"a flip at byte {pos} of {path.name} ({size} bytes) loaded")
            assert digests(store.root) == before  # refused and left as it is
            _flip(path, pos)  # put it back
    caches = [make_layer_cache(config) for _ in range(len(chat.state.caches))]
    store.load("s", caches)
    assert same_caches(chat.state.caches, caches)


def test_a_save_failing_at_any_step_leaves_the_last_save_opening_bitwise(engine, tmp_path):
    """SQLite's crash test: make every write, sync, link and rename of a save fail in turn."""
    config = CacheConfig()
    template = tmp_path / "template"
    store = SessionStore(template)
    chat = Chat.open(engine, store, "s", cache_config=config, sampling=SAMPLING)
    chat.set_system(LONG)
    turn(chat, "Hello there")
    first_tokens = list(chat.state.tokens)
    first = [make_layer_cache(config) for _ in chat.state.caches]
    store.load("s", first)
    chat.close()
    # the second state, computed once in memory, saved again and again below
    live = Chat(engine, config, SAMPLING)
    live.messages, live.state = list(chat.messages), chat.state
    turn(live, "Tell me more about it, please, in detail.")

    def save(st: SessionStore) -> None:
        st.save("s", messages=live.messages, tokens=live.state.tokens, caches=live.state.caches, cache_config=config,
                model_name=engine.loaded.name, model_fingerprint=engine.loaded.fingerprint,
                sampling=SAMPLING.to_dict(), title="s")

    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    durable.count_operations()
    save(SessionStore(probe))
    ops = durable.operations_seen()
    durable.fail_on(None)
    kinds = {what for what, _, _ in ops}
    assert len(ops) >= 6 and {"create", "write", "fsync", "link", "rename"} <= kinds, ops
    for k, op in enumerate(ops):
        root = tmp_path / f"crash-{k}"
        shutil.copytree(template, root)
        st = SessionStore(root)
        durable.fail_on(op)  # exactly this operation fails, whichever thread reaches it first
        try:
            save(st)
            failed = False
        except StoreError:
            failed = True
        finally:
            durable.fail_on(None)
        caches = [make_layer_cache(config) for _ in live.state.caches]
        data = st.load("s", caches)
        if data.tokens == first_tokens:
            assert failed and same_caches(first, caches), op
        else:  # only a failure after the new index was in place can leave the new state
            assert data.tokens == live.state.tokens and same_caches(live.state.caches, caches), op
        save(st)  # and the next save goes through
        caches = [make_layer_cache(config) for _ in live.state.caches]
        assert st.load("s", caches).tokens == live.state.tokens and same_caches(live.state.caches, caches)


def test_kv_in_another_float_type_is_converted_on_load(engine, tmp_path):
    config = CacheConfig()
    store = SessionStore(tmp_path / "home")
    caches = [FullKVCache(config) for _ in range(2)]
    mx.random.seed(3)
    for c in caches:
        k = mx.random.normal((1, 2, 300, 16)).astype(mx.bfloat16)
        c.update_and_fetch(k, k * 2)
    kw = dict(messages=[], tokens=list(range(300)), cache_config=config, model_name="m", model_fingerprint="f",
              sampling={}, title="t")
    store.save("s", caches=caches, **kw)
    before = digests(store.root)
    loaded = [FullKVCache(config) for _ in range(2)]
    data = store.load("s", loaded, kv_dtype="float32")
    assert data.converted_from == "bfloat16" and loaded[0].dtype == mx.float32
    assert all(mx.array_equal(p.astype(mx.float32), q).item() for c, d in zip(caches, loaded) for p, q in zip(planes(c), planes(d)))
    assert digests(store.root) == before
    same = [FullKVCache(config) for _ in range(2)]
    assert store.load("s", same, kv_dtype="bfloat16").converted_from is None and same_caches(caches, same)


def test_a_v1_session_with_blocks_in_two_float_types_opens(tmp_path):
    """Extended once in bfloat16 and once in float32 by kvchat 1, such a session became unloadable."""
    config = CacheConfig()

    def caches_in(dtype):
        out = [FullKVCache(config) for _ in range(2)]
        mx.random.seed(5)
        for c in out:
            k = mx.random.normal((1, 2, 300, 16))
            c.update_and_fetch(k.astype(dtype), (k * 2).astype(dtype))
        return out

    kw = dict(messages=[], tokens=list(range(300)), cache_config=config, model_name="m", model_fingerprint="f",
              sampling={}, title="t")
    bf, f32 = caches_in(mx.bfloat16), caches_in(mx.float32)
    root = tmp_path / "home"
    write_v1(root, "a", caches=bf, **kw)
    write_v1(tmp_path / "other", "b", caches=f32, **kw)
    a = json.loads((root / "sessions" / "a.json").read_text())
    tail = json.loads((tmp_path / "other" / "sessions" / "b.json").read_text())["kv"]["blocks"][1]
    tail["file"] = f"{tail['key']}-{tail['sha256'][:16]}.safetensors"  # same tokens, other bytes: named beside
    shutil.copy(tmp_path / "other" / "blocks" / f"{tail['key']}.safetensors", root / "blocks" / tail["file"])
    a.pop("checksum")
    a["kv"]["blocks"][1] = tail  # its tail was saved by a float32 run
    for layer in a["kv"]["layers"]:
        layer["dtype"] = "float32"
    body = canonical_json(a)
    (root / "sessions" / "a.json").write_bytes(b'{"checksum":"' + hashlib.sha256(body).hexdigest().encode() + b'",' + body[1:])
    loaded = [FullKVCache(config) for _ in range(2)]
    SessionStore(root).load("a", loaded)
    assert loaded[0].dtype == mx.float32
    k = loaded[0].temporal_planes()[0][0]
    assert mx.array_equal(k[..., :256, :], bf[0].temporal_planes()[0][0][..., :256, :].astype(mx.float32)).item()
    assert mx.array_equal(k[..., 256:, :], f32[0].temporal_planes()[0][0][..., 256:, :]).item()


def test_fullfsync_falls_back_to_fsync_where_the_platform_has_none(tmp_path):
    path = tmp_path / "f"
    assert durable.write_atomic(path, b"data")
    assert path.read_bytes() == b"data"
    import fcntl
    import sys

    assert (durable._F_FULLFSYNC is not None) == (sys.platform == "darwin" and hasattr(fcntl, "F_FULLFSYNC"))
    fd = durable.os.open(path, durable.os.O_RDONLY)
    try:
        durable.sync_fd(fd, path)  # F_FULLFSYNC on macOS, fsync elsewhere; raises on neither
    finally:
        durable.os.close(fd)
    new = tmp_path / "a" / "b" / "c"
    durable.make_dirs(new)
    assert new.is_dir()


def test_token_ids_beyond_the_vocabulary_are_damage(engine, tmp_path):
    from mlx_cache.store.index import index_bytes

    store = SessionStore(tmp_path / "home")
    chat = Chat.open(engine, store, "s", sampling=SAMPLING)
    turn(chat, "Hello there")
    chat.close()
    path = store.sessions_dir / "s.json"
    index = json.loads(path.read_text())
    index.pop("checksum")
    index["tokens"][-1] = engine.loaded.model.args.vocab_size  # one past the last id; checksum made valid again
    path.write_bytes(index_bytes(index))
    before = digests(store.root)
    with pytest.raises(SessionCorrupt, match="vocabulary"):
        Chat.open(engine, store, "s", sampling=SAMPLING)
    assert digests(store.root) == before
