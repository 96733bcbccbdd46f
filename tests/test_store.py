"""The session store: exact resume, O(new tokens) autosave, sharing, and never losing a save."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cache import CacheConfig, FullKVCache, RotatingKVCache
from mlx_cache.store import (
    BLOCK_TOKENS,
    InvalidSessionName,
    SessionCorrupt,
    SessionInUse,
    SessionMismatch,
    SessionNotFound,
    SessionStore,
    StoreError,
)
from models.chat import Chat
from models.engine import Engine, Finished
from models.sample import GREEDY
from models.template import common_prefix

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = GREEDY.with_(max_tokens=8)
LONG = "Answer in the voice of a patient teacher who explains every step. " * 9  # ~600 byte-level tokens

CONFIGS = {
    "full": CacheConfig(),
    "q4": CacheConfig(k_bits=4, v_bits=4),
    "q4-float-head": CacheConfig(k_bits=4, v_bits=4, keep_fp=16),
    "rotating": CacheConfig(kind="rotating", window=32, sinks=4),
    "rotating-q4": CacheConfig(kind="rotating", window=32, sinks=4, k_bits=4, v_bits=4),
    "rotating-q8-float-head": CacheConfig(kind="rotating", window=40, sinks=4, k_bits=8, v_bits=8, keep_fp=4),
    "rotated-q4": CacheConfig(k_bits=4, v_bits=4, rotate=True),
    "rotating-rotated-q3": CacheConfig(kind="rotating", window=32, sinks=4, k_bits=3, v_bits=3, rotate=True),
    # the quality levers: float sinks and window, per-channel keys (the window is saved beside the blocks)
    "k4v3-window": CacheConfig(k_bits=4, v_bits=3, keep_fp=4, fp_window=24),
    "q3-window": CacheConfig(k_bits=3, v_bits=3, fp_window=8),
    "q4-keys-per-channel": CacheConfig(k_bits=4, v_bits=4, k_per_channel=True, keep_fp=4, fp_window=8),
    "k4v2-keys-per-channel": CacheConfig(k_bits=4, v_bits=2, k_per_channel=True, keep_fp=4, fp_window=96),  # kv4-fast
    "rotating-q4-window": CacheConfig(kind="rotating", window=40, sinks=4, k_bits=4, v_bits=4, keep_fp=4,
                                      fp_window=16),
}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["llama"])


@pytest.fixture
def store(tmp_path):
    return SessionStore(tmp_path / "home")


def turn(chat: Chat, text: str) -> Finished:
    return [e for e in chat.send(text) if isinstance(e, Finished)][-1]


def open_chat(engine, store, name, config=None, system=None) -> Chat:
    chat = Chat.open(engine, store, name, cache_config=config, sampling=SAMPLING)
    if system and not chat.messages:
        chat.set_system(system)
    return chat


def resume_with_checkpoint(engine, store, name) -> Chat:
    """Chat.open plus the rotating-window checkpoint the store keeps."""
    lock = store.lock(name)
    info = store.read(name)
    chat = Chat(engine, info.meta.cache_config, SAMPLING, store, name)
    data = store.load(name, chat.state.caches, model_fingerprint=engine.loaded.fingerprint)
    chat.messages, chat.state.tokens = list(data.messages), list(data.tokens)
    chat.title, chat.created = data.meta.title, data.meta.created
    chat.state.checkpoint = data.checkpoint
    chat._lock = lock
    return chat


def save_with_checkpoint(chat: Chat) -> None:
    chat.store.save(
        chat.name, messages=chat.messages, tokens=chat.state.tokens, caches=chat.state.caches,
        cache_config=chat.state.config, model_name=chat.engine.loaded.name,
        model_fingerprint=chat.engine.loaded.fingerprint, sampling=chat.sampling.to_dict(),
        title=chat.title or chat.name, created=chat.created, checkpoint=chat.state.checkpoint,
    )


def planes_equal(a, b) -> bool:
    pa, pb = a.temporal_planes(), b.temporal_planes()
    return all(mx.array_equal(x, y).item() for x, y in zip(pa[0] + pa[1], pb[0] + pb[1]))


def step_logits(model, caches, tokens: list[int], decode_steps: int = 3) -> list[mx.array]:
    """Logits for a chunk of new tokens, then a few greedy single-token steps."""
    out = [model(mx.array(tokens)[None], cache=caches)[0, -1]]
    for _ in range(decode_steps):
        out.append(model(mx.argmax(out[-1]).reshape(1, 1), cache=caches)[0, -1])
    mx.eval(out)
    return out


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }


def blocks(store: SessionStore) -> dict[str, tuple[int, int]]:
    """KV files by name -> (inode, mtime_ns): unchanged files keep both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.blocks_dir.iterdir()}


def index_of(store: SessionStore, name: str) -> dict:
    return json.loads((store.sessions_dir / f"{name}.json").read_text())


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


# -- exact resume ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_resume_restores_the_cache_bitwise(engine, store, kind):
    config = CONFIGS[kind]
    live = open_chat(engine, store, "s", config, system=LONG if config.kind == "full" else None)
    turn(live, "Hello there, how are you doing today my friend?")
    turn(live, "Tell me more about that, please.")
    live.close()
    if config.kind == "rotating":
        assert live.state.caches[0].wrapped
    else:
        assert len(live.state.tokens) > 2 * BLOCK_TOKENS  # several blocks plus a partial tail

    resumed = open_chat(engine, store, "s", config)
    assert resumed.state.tokens == live.state.tokens and resumed.messages == live.messages
    for a, b in zip(live.state.caches, resumed.state.caches):
        assert a.offset == b.offset and planes_equal(a, b)
    new = engine.encode(live.messages + [{"role": "user", "content": "And then?"}])[len(live.state.tokens):]
    want = step_logits(engine.model, live.state.caches, new)
    got = step_logits(engine.model, resumed.state.caches, new)
    assert all(mx.array_equal(x, y).item() for x, y in zip(want, got))
    resumed.close()


@pytest.mark.parametrize("kind", ["full", "q4-keys-per-channel", "k4v2-keys-per-channel"])
def test_a_regenerated_answer_with_the_same_tokens_resumes_as_the_caches_hold_it(engine, store, kind):
    """A greedy regenerate gives the same tokens, but their KV is computed again (and per-channel
    key codes regrouped after the trim): the save must store the caches as they are now."""
    config = CONFIGS[kind]
    live = open_chat(engine, store, "s", config, system=LONG)
    first = turn(live, "Hello there, how are you doing today my friend?")
    tokens = list(live.state.tokens)
    again = [e for e in live.regenerate() if isinstance(e, Finished)][-1]
    assert again.text == first.text and live.state.tokens == tokens  # the very same tokens
    assert live.state.changed_from is None  # saved: nothing differs from the store any more
    live.close()
    resumed = open_chat(engine, store, "s", config)
    for a, b in zip(live.state.caches, resumed.state.caches):
        assert a.offset == b.offset and planes_equal(a, b)
        assert all(mx.array_equal(x, y).item() for x, y in zip(a.extras().get("tail", ()), b.extras().get("tail", ())))
    new = engine.encode(live.messages + [{"role": "user", "content": "And then?"}])[len(live.state.tokens):]
    want = step_logits(engine.model, live.state.caches, new)
    got = step_logits(engine.model, resumed.state.caches, new)
    assert all(mx.array_equal(x, y).item() for x, y in zip(want, got))
    resumed.close()


@pytest.mark.parametrize("kind", ["full", "q4", "rotating", "rotating-q4"])
def test_resume_prefills_only_the_new_turn(engine, store, kind):
    config = CONFIGS[kind]
    live = open_chat(engine, store, "s", config)
    turn(live, "Hello there, how are you doing today my friend?")
    saved = list(live.state.tokens)
    live.close()
    resumed = open_chat(engine, store, "s", config)

    a = turn(live, "What about tomorrow?")
    b = turn(resumed, "What about tomorrow?")
    target_len = a.stats.prompt_tokens
    kept = common_prefix(saved, engine.encode(resumed.messages[:-1]))
    assert b.stats.reused_tokens == kept == len(saved)
    assert b.stats.prefilled_tokens == target_len - kept
    assert (b.text, b.stats.prefilled_tokens, b.stats.reused_tokens) == (a.text, a.stats.prefilled_tokens, a.stats.reused_tokens)
    assert resumed.state.tokens == live.state.tokens
    resumed.close()


@pytest.mark.parametrize("kind", ["rotating", "rotating-q4-window"])
def test_rotating_checkpoint_survives_resume(engine, store, kind):
    """Regenerating on a wrapped window goes back to the saved checkpoint, as without the restart."""
    live = Chat(engine, CONFIGS[kind], GREEDY.with_(max_tokens=30), store, "r")
    first = turn(live, "a b c d e f g h i j k l m n o p q r s t")
    assert live.state.caches[0].wrapped
    save_with_checkpoint(live)

    resumed = resume_with_checkpoint(engine, store, "r")
    resumed.sampling = live.sampling
    assert resumed.state.checkpoint is not None
    a = [e for e in live.regenerate()][-1]
    b = [e for e in resumed.regenerate()][-1]
    assert b.stats.restored_checkpoint and b.stats.prefilled_tokens == 1
    assert (a.text, a.stats.prefilled_tokens) == (b.text, b.stats.prefilled_tokens) == (first.text, 1)
    assert all(planes_equal(x, y) for x, y in zip(live.state.caches, resumed.state.caches))
    resumed.close()


def test_model_state_layers_round_trip(tmp_path):
    """Non-KV caches of hybrid models (mlx-lm's ArraysCache) are stored whole."""
    from mlx_lm.models.cache import ArraysCache

    store = SessionStore(tmp_path)
    config = CacheConfig()
    kv = FullKVCache(config)
    kv.update_and_fetch(mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64)))
    state = ArraysCache(2)
    state[0], state[1] = mx.random.normal((1, 3, 8)), mx.random.normal((1, 4))
    store.save("h", messages=[], tokens=list(range(300)), caches=[kv, state], cache_config=config,
               model_name="m", model_fingerprint="f", sampling={}, title="t")
    kv2, state2 = FullKVCache(config), ArraysCache(2)
    store.load("h", [kv2, state2], model_fingerprint="f", cache_config=config)
    assert planes_equal(kv, kv2)
    assert all(mx.array_equal(a, b).item() for a, b in zip(state.cache, state2.cache))


# -- autosave cost, forks, prefix sharing, gc ------------------------------------------------


def test_save_after_a_turn_writes_only_new_blocks(engine, store):
    chat = open_chat(engine, store, "s", system=LONG)
    turn(chat, "Hello there, how are you doing today my friend?")
    before = blocks(store)
    kv = index_of(store, "s")["kv"]
    entries = kv["blocks"]
    full = [e["file"] for e in entries if e["end"] - e["start"] == BLOCK_TOKENS]
    assert len(full) >= 2 and len(entries) == len(full) + 1  # complete blocks plus a tail
    assert len(set(full)) == 1 and len(kv["packs"]) == 2  # the first save: one pack of full blocks, one tail
    n_before = len(chat.state.tokens)

    turn(chat, "Short follow-up.")
    after = blocks(store)
    added = set(after) - set(before)
    for f in full:  # complete blocks are immutable: same inode, never rewritten
        assert after[f] == before[f]
    assert len(added) == 1  # only the new tail (the turn did not complete a block)
    assert entries[-1]["file"] not in after  # the stale tail went with the save
    new_tokens = len(chat.state.tokens) - n_before
    per_token = sum(p["bytes"] / (p["end"] - p["start"]) for p in kv["packs"] if p["file"] == full[0])
    written = sum((store.blocks_dir / f).stat().st_size for f in added)
    assert written < per_token * (BLOCK_TOKENS + new_tokens) * 1.1
    chat.close()


def test_fork_shares_blocks_and_copies_no_kv(engine, store):
    chat = open_chat(engine, store, "src", system=LONG)
    turn(chat, "Hello there, how are you doing today my friend?")
    chat.close()
    before = blocks(store)
    store.fork("src", "copy")
    assert blocks(store) == before  # no KV file written or touched
    assert index_of(store, "copy")["kv"] == index_of(store, "src")["kv"]
    # told apart in every list (the app's browser, `sessions list`) whichever way it was forked
    assert store.read("copy").meta.title == f"{store.read('src').meta.title or 'src'} (fork)"
    with pytest.raises(StoreError, match="already exists"):
        store.fork("src", "copy")

    fork = open_chat(engine, store, "copy")
    assert fork.state.tokens == chat.state.tokens
    turn(fork, "A different direction.")
    fork.close()
    src = open_chat(engine, store, "src")
    assert src.state.tokens == chat.state.tokens and src.messages == chat.messages
    src.close()


def test_sessions_with_one_system_prompt_share_its_blocks(engine, store):
    a = open_chat(engine, store, "a", system=LONG)
    turn(a, "First question about apples?")
    a.close()
    b = open_chat(engine, store, "b", system=LONG)
    fin = turn(b, "Second question about pears?")
    b.close()
    # a new chat reused the stored prefix instead of prefilling it
    assert fin.stats.reused_tokens == 2 * BLOCK_TOKENS
    assert fin.stats.prefilled_tokens == fin.stats.prompt_tokens - 2 * BLOCK_TOKENS
    fa = [e["file"] for e in index_of(store, "a")["kv"]["blocks"]]
    fb = [e["file"] for e in index_of(store, "b")["kv"]["blocks"]]
    assert fa[:2] == fb[:2] and fa[2:] != fb[2:]  # the system prompt's blocks are stored once
    assert len(list(store.blocks_dir.iterdir())) == len(set(fa) | set(fb))
    # and b resumes exactly like a chat that never stopped
    live_next = engine.encode(b.messages + [{"role": "user", "content": "More?"}])[len(b.state.tokens):]
    b2 = open_chat(engine, store, "b")
    want = step_logits(engine.model, b.state.caches, live_next)
    got = step_logits(engine.model, b2.state.caches, live_next)
    assert all(mx.array_equal(x, y).item() for x, y in zip(want, got))
    b2.close()


def test_load_prefix_keeps_one_token_to_run(engine, store):
    chat = open_chat(engine, store, "a", system=LONG)
    turn(chat, "Hi")
    chat.close()
    tokens = chat.state.tokens
    fp, config = engine.loaded.fingerprint, CacheConfig()
    for n, expected in [(2 * BLOCK_TOKENS + 1, 2 * BLOCK_TOKENS), (2 * BLOCK_TOKENS, BLOCK_TOKENS), (BLOCK_TOKENS, 0)]:
        caches = engine.new_state(config).caches
        assert store.load_prefix(fp, config, tokens[:n], caches) == expected
        assert all(c.offset == expected for c in caches)
    other = engine.new_state(CONFIGS["q4"]).caches
    assert store.load_prefix(fp, CONFIGS["q4"], tokens, other) == 0  # another cache layout never matches
    assert store.load_prefix("0" * 32, config, tokens, engine.new_state(config).caches) == 0


def test_gc_removes_only_unreferenced_files(engine, store):
    chat = open_chat(engine, store, "a", system=LONG)
    turn(chat, "Hello there")
    chat.close()
    store.fork("a", "b")
    old_tail = index_of(store, "a")["kv"]["blocks"][-1]["file"]
    chat = open_chat(engine, store, "a")
    turn(chat, "Keep going")
    chat.close()
    assert (store.blocks_dir / old_tail).exists()  # the fork still uses it
    (store.blocks_dir / ".x.123-abc.tmp").write_bytes(b"left by a killed write")
    assert tuple(store.gc()) == (1, len(b"left by a killed write"))
    size = (store.blocks_dir / old_tail).stat().st_size
    assert store.remove("b") == (1, size)  # deleting a session frees what no other session uses
    assert not (store.blocks_dir / old_tail).exists()
    assert tuple(store.gc()) == (0, 0)
    open_chat(engine, store, "a").close()  # still loads


def test_rename_remove_list_and_exports(engine, store, tmp_path):
    chat = open_chat(engine, store, "a")
    turn(chat, "Hello there")
    chat.close()
    time.sleep(0.01)
    chat = open_chat(engine, store, "b")
    turn(chat, "Second chat")
    chat.close()
    assert [m.name for m in store.list()] == ["b", "a"]  # newest first
    meta = store.list()[0].to_dict()
    assert meta["title"] == "Second chat" and meta["tokens"] == len(chat.state.tokens) and meta["bytes_on_disk"] > 0

    store.rename("a", "c")
    assert not store.exists("a") and store.exists("c")
    with pytest.raises(StoreError, match="already exists"):
        store.rename("c", "b")
    with pytest.raises(SessionNotFound):
        store.rename("a", "d")
    md = store.export_markdown("c")
    assert md.startswith("# Hello there") and "## User\n\nHello there" in md and "## Assistant" in md
    store.remove("c")
    assert not store.exists("c")
    with pytest.raises(SessionNotFound):
        store.read("c")
    with pytest.raises(SessionNotFound):
        store.remove("c")
    assert [m.name for m in store.list()] == ["b"]


def test_default_root_follows_kvchat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "elsewhere"))
    assert SessionStore().root == tmp_path / "elsewhere"
    monkeypatch.delenv("KVCHAT_HOME")
    assert SessionStore().root.name == "kvchat"


@pytest.mark.parametrize("kind", ["full", "q4", "rotating"])
def test_export_mlx_lm_loads_with_mlx_lm(engine, store, tmp_path, kind):
    from mlx_lm.models.cache import load_prompt_cache

    config = CONFIGS[kind]
    chat = open_chat(engine, store, "s", config, system=LONG if kind != "rotating" else None)
    turn(chat, "Hello there, how are you doing today my friend?")
    chat.close()
    out = tmp_path / "prompt.safetensors"
    store.export_mlx_lm("s", out)
    cache, meta = load_prompt_cache(str(out), return_metadata=True)
    expected = {"full": "KVCache", "q4": "QuantizedKVCache", "rotating": "RotatingKVCache"}[kind]
    assert {type(c).__name__ for c in cache} == {expected}
    assert json.loads(meta["tokens"]) == chat.state.tokens
    # Compared with the session as it loads (a window in position order, like the export).
    # mlx-lm masks a multi-token chunk on a wrapped window its own way: compare decoding there.
    resumed = open_chat(engine, store, "s")
    new = [10] if kind == "rotating" else engine.encode(chat.messages + [{"role": "user", "content": "Next"}])[len(chat.state.tokens):]
    want = step_logits(engine.model, resumed.state.caches, new)
    got = step_logits(engine.model, cache, new)
    assert all(mx.array_equal(x, y).item() for x, y in zip(want, got))
    resumed.close()


def test_export_mlx_lm_of_a_windowed_per_channel_session_continues_like_the_session(engine, store, tmp_path):
    # mlx-lm gets float keys and values: the codes dequantized (per-channel keys too), the
    # float sinks and window as they were. It then attends over those floats, the session
    # over its codes: the same attention up to rounding.
    from mlx_lm.models.cache import load_prompt_cache

    chat = open_chat(engine, store, "s", CONFIGS["q4-keys-per-channel"], system=LONG)
    turn(chat, "Hello there, how are you doing today my friend?")
    chat.close()
    out = tmp_path / "prompt.safetensors"
    store.export_mlx_lm("s", out)
    cache = load_prompt_cache(str(out))
    assert {type(c).__name__ for c in cache} == {"KVCache"}
    live = chat.state.caches[0]
    n = live._fp_tail[0].shape[2]  # the window, or more while a key group is unfinished
    window_k = live._fp_tail[0]
    assert mx.allclose(cache[0].keys[..., len(chat.state.tokens) - n : len(chat.state.tokens), :], window_k, atol=1e-5).item()
    resumed = open_chat(engine, store, "s")
    new = engine.encode(chat.messages + [{"role": "user", "content": "Next"}])[len(chat.state.tokens):]
    want = step_logits(engine.model, resumed.state.caches, new)
    got = step_logits(engine.model, cache, new)
    # the session quantizes the window tokens the new ones push out; mlx-lm keeps them float
    # (measured 0.016 on logits of ~4 with a 24-token window)
    assert all(mx.allclose(x, y, atol=0.05).item() for x, y in zip(want, got))
    resumed.close()


# -- nothing is ever lost ------------------------------------------------------------------


def test_second_lock_is_refused(engine, store):
    chat = open_chat(engine, store, "s")
    turn(chat, "hi")
    with pytest.raises(SessionInUse, match="'s'"):
        store.lock("s")
    with pytest.raises(SessionInUse):
        Chat.open(engine, store, "s")
    chat.close()
    store.lock("s").release()


def test_lock_held_by_another_process(engine, store):
    chat = open_chat(engine, store, "s")
    turn(chat, "hi")
    chat.close()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mlx_cache.store import SessionStore;"
         "l = SessionStore(sys.argv[1]).lock('s'); print('locked', flush=True); sys.stdin.read()", str(store.root)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(SessionInUse, match="another kvchat"):
            Chat.open(engine, store, "s")
        with pytest.raises(SessionInUse):  # saving needs the lock too
            store.save("s", messages=[], tokens=[], caches=[], cache_config=CacheConfig(), model_name="m",
                       model_fingerprint="f", sampling={}, title="t")
        with pytest.raises(SessionInUse):
            store.remove("s")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    open_chat(engine, store, "s").close()  # the lock went with the process


def _corrupt_block(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10
    path.write_bytes(bytes(data))


def _with_index(transform):
    def apply(store: SessionStore, name: str) -> None:
        path = store.sessions_dir / f"{name}.json"
        path.write_bytes(transform(path.read_bytes()))
    return apply


def _set_version(raw: bytes) -> bytes:
    obj = json.loads(raw)
    obj["version"] = 99
    return json.dumps(obj).encode()


DAMAGE = {
    "truncated block": (lambda s, n: _first_block(s, n).write_bytes(_first_block(s, n).read_bytes()[:500]), SessionCorrupt, "damaged"),
    "bit flip in block": (lambda s, n: _corrupt_block(_first_block(s, n)), SessionCorrupt, "checksum"),
    "missing block": (lambda s, n: _first_block(s, n).unlink(), SessionCorrupt, "missing"),
    "bit flip in index": (_with_index(lambda raw: raw.replace(b'"title":"', b'"title":"X', 1)), SessionCorrupt, "checksum"),
    "truncated index": (_with_index(lambda raw: raw[: len(raw) // 2]), SessionCorrupt, "JSON"),
    "foreign json": (_with_index(lambda raw: b'{"hello": "world"}'), SessionCorrupt, "not a kvchat session"),
    "unknown version": (_with_index(_set_version), SessionCorrupt, "reads only versions 1, 2"),
}


def _first_block(store: SessionStore, name: str) -> Path:
    return store.blocks_dir / index_of(store, name)["kv"]["blocks"][0]["file"]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_session_is_refused_and_left_alone(engine, store, case):
    damage, error, words = DAMAGE[case]
    for name, text in [("good", "Hello there"), ("bad", "A different first message " * 12)]:
        chat = open_chat(engine, store, name)
        turn(chat, text)
        chat.close()
    damage(store, "bad")
    before = file_digests(store.root)
    with pytest.raises(error, match=words) as info:
        Chat.open(engine, store, "bad")
    assert "'bad'" in str(info.value) and str(info.value).count(". ") == 0  # one sentence naming the session
    assert file_digests(store.root) == before
    open_chat(engine, store, "good").close()
    index_damaged = "index" in case or case in ("foreign json", "unknown version")
    # a damaged index drops out of the listing (and shows in broken()); damaged KV shows when opened
    assert sorted(m.name for m in store.list()) == (["good"] if index_damaged else ["bad", "good"])
    assert [n for n, _ in store.broken()] == (["bad"] if index_damaged else [])
    assert file_digests(store.root) == before


def test_other_model_or_cache_layout_is_refused(engine, store):
    chat = open_chat(engine, store, "s", CONFIGS["q4"])
    turn(chat, "Hello")
    chat.close()
    before = file_digests(store.root)
    with pytest.raises(SessionMismatch, match="another model"):
        store.load("s", engine.new_state(CONFIGS["q4"]).caches, model_fingerprint="0" * 32)
    with pytest.raises(SessionMismatch, match="'full q4', not the requested 'full'"):
        Chat.open(engine, store, "s", cache_config=CacheConfig())
    with pytest.raises(SessionMismatch):  # caches built for another layout
        store.load("s", engine.new_state(CONFIGS["rotating"]).caches)
    assert file_digests(store.root) == before
    open_chat(engine, store, "s", CONFIGS["q4"]).close()


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden", "x" * 65, "a b", "naïve", "..", "a\\b"])
def test_invalid_session_names(store, bad):
    for call in (store.lock, store.exists, store.read, store.remove, lambda n: store.fork("ok", n)):
        with pytest.raises(InvalidSessionName):
            call(bad)
    with pytest.raises(InvalidSessionName):
        store.save(bad, messages=[], tokens=[], caches=[], cache_config=CacheConfig(), model_name="m",
                   model_fingerprint="f", sampling={}, title="t")
    assert not store.root.parent.joinpath("x.json").exists()


# A child that keeps saving two sessions (full and rotating) whose K/V encode their
# token positions, so any state that loads can be checked for consistency.
SAVER = """
import sys
import mlx.core as mx
from mlx_cache import CacheConfig, FullKVCache, RotatingKVCache
from mlx_cache.store import SessionStore

store = SessionStore(sys.argv[1])
configs = {"full": CacheConfig(), "rot": CacheConfig(kind="rotating", window=40, sinks=4)}
locks = {n: store.lock(n) for n in configs}
states = {}
for n, cfg in configs.items():
    caches = [(FullKVCache if cfg.kind == "full" else RotatingKVCache)(cfg) for _ in range(4)]
    tokens = []
    if store.exists(n):
        tokens = store.load(n, caches).tokens
    states[n] = (cfg, caches, tokens)

def add(caches, start, n):
    pos = mx.arange(start, start + n).astype(mx.float32)[None, None, :, None]
    for layer, c in enumerate(caches):
        k = mx.broadcast_to(pos + 0.25 * layer, (1, 2, n, 64))
        c.update_and_fetch(k, -k)

rng = __import__("random").Random(int(sys.argv[2]))
print("ready", flush=True)
while True:
    for n, (cfg, caches, tokens) in states.items():
        k = rng.randint(20, 150)
        add(caches, len(tokens), k)
        tokens.extend(range(len(tokens), len(tokens) + k))
        print("saving", n, len(tokens), flush=True)
        store.save(n, messages=[{"role": "user", "content": str(len(tokens))}], tokens=tokens, caches=caches,
                   cache_config=cfg, model_name="m", model_fingerprint="f", sampling={}, title=n)
        print("saved", n, len(tokens), flush=True)
"""


def _check_consistent(store: SessionStore, name: str, config: CacheConfig) -> int:
    caches = [(FullKVCache if config.kind == "full" else RotatingKVCache)(config) for _ in range(4)]
    data = store.load(name, caches)
    n = len(data.tokens)
    assert data.tokens == list(range(n)) and data.messages[0]["content"] == str(n)
    held = list(range(n)) if config.kind == "full" or n <= 44 else list(range(4)) + list(range(n - 40, n))
    for layer, c in enumerate(caches):
        keys = c.temporal_planes()[0][0][0, 0, :, 0]
        assert keys.tolist() == [p + 0.25 * layer for p in held]
    return n


def test_kill_during_saves_leaves_last_save_loadable(tmp_path):
    root = tmp_path / "home"
    configs = {"full": CacheConfig(), "rot": CacheConfig(kind="rotating", window=40, sinks=4)}
    rng = random.Random(1)
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(root), str(round_)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        saved = {n: 0 for n in configs}
        saving = {n: 0 for n in configs}
        for line in out.splitlines():
            what, n, count = line.split()
            (saved if what == "saved" else saving)[n] = int(count)
        store = SessionStore(root)
        for n, cfg in configs.items():
            if not store.exists(n):
                assert saved[n] == 0
                continue
            # the last completed save, or the one in flight if its index was already in place
            assert _check_consistent(store, n, cfg) in {saved[n], saving[n]}
    SessionStore(root).gc()
    left = [p.name for d in ("sessions", "blocks") for p in (root / d).iterdir() if ".tmp" in p.name]
    assert left == []  # gc clears what killed writes left behind
    for n, cfg in configs.items():
        _check_consistent(SessionStore(root), n, cfg)


def test_failed_write_keeps_previous_state(engine, store):
    chat = open_chat(engine, store, "s")
    turn(chat, "Hello there")
    chat.close()
    saved = list(chat.state.tokens)
    before = file_digests(store.root)
    # The child may write files of at most 4 KiB: the new block cannot be written (EFBIG).
    result = run_py(
        """
        import resource, signal, sys
        import mlx.core as mx
        from mlx_cache import CacheConfig, FullKVCache
        from mlx_cache.store import SessionStore, StoreError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        caches = [FullKVCache(CacheConfig()) for _ in range(2)]
        for c in caches:
            c.update_and_fetch(mx.ones((1, 2, 400, 64)), mx.ones((1, 2, 400, 64)))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            SessionStore(sys.argv[1]).save("s", messages=[], tokens=list(range(400)), caches=caches,
                cache_config=CacheConfig(), model_name="m", model_fingerprint=sys.argv[2], sampling={}, title="t")
        except StoreError as e:
            print(e)
            sys.exit(3)
        """,
        str(store.root), engine.loaded.fingerprint,
    )
    assert result.returncode == 3, result.stderr
    assert "Could not save session 's'" in result.stdout and "intact" in result.stdout
    assert file_digests(store.root) == before  # no partial file, no temp file left
    resumed = open_chat(engine, store, "s")
    assert resumed.state.tokens == saved
    resumed.close()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_blocks_dir_keeps_previous_state(engine, store):
    chat = open_chat(engine, store, "s")
    turn(chat, "Hello there")
    saved = list(chat.state.tokens)
    store.blocks_dir.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="intact"):
            turn(chat, "More")
    finally:
        store.blocks_dir.chmod(0o755)
    chat.close()
    resumed = open_chat(engine, store, "s")
    assert resumed.state.tokens == saved
    resumed.close()


class CountingStore(SessionStore):
    """The real store, counting how often a session's index is read from disk and parsed."""

    parsed = 0

    def index(self, name, raw=None):
        self.parsed += 1
        return super().index(name, raw)


def test_opening_a_session_reads_and_verifies_its_index_once(engine, tmp_path):
    store = CountingStore(tmp_path / "home")
    live = open_chat(engine, store, "s", CONFIGS["q4"])
    turn(live, "Hello there, how are you doing today my friend?")
    live.close()
    store.parsed = 0
    resumed = open_chat(engine, store, "s")
    assert store.parsed == 1  # Chat.open's read, then the load starts from it
    assert resumed.state.tokens == live.state.tokens
    resumed.close()
