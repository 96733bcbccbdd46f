"""Sessions on disk: kvchat's store beside mlx-lm and a plain read (load, first save), autosave cost, resume vs re-prefill.

    python benchmarks/bench_sessions.py [--contexts 1024 4096 16384] [--rounds 5]
                                        [--quick] [--out PATH] [--repeats 11]
                                        [--resume [--model M] [--prefill-measure 4096]]

Every part uses caches in SmolLM2-135M's KV shape (30 layers, 3 KV heads,
head dim 64) filled with random keys and values in 512-token chunks through
``update_and_fetch`` (a prefill's pattern; only the bytes matter to a store).

Side by side (the main part), for fp16 full caches and q4 (``CacheConfig(
k_bits=4, v_bits=4)``, group 64) at each of --contexts tokens. kvchat's caches
(``make_layer_cache``) and mlx-lm's (``KVCache``; ``QuantizedKVCache(group_size=
64, bits=4)`` for q4) are fed the very same random K/V chunks, and the planes
are checked equal (``same_data``), so both sides store the same bytes.

- LOAD, warm (files in the page cache) and cold (each side's files evicted
  with ``posix_fadvise(POSIX_FADV_DONTNEED)`` right before its timed call,
  after one ``os.sync()``; ``resident_after_evict`` says what fraction of the
  pages were still cached after an eviction, measured with ``mincore``):
    kvchat    ``SessionStore(root).load(name, fresh)`` into 30 fresh
              ``make_layer_cache(config)`` caches, then ``mx.eval`` of their
              planes: read, every byte verified, caches ready for the next token;
    mlx-lm    ``load_prompt_cache(file)`` then ``mx.eval([c.state for c in cache])``
              (mlx-lm checks nothing);
    plain     every byte of kvchat's files (the index, then each pack file the
              index names) read sequentially with ``readinto`` into one bytearray
              allocated once before the rounds: the machine's read speed.
  Sides alternate (the order rotates each round), best of --rounds and median,
  in one process. ``kvchat_vs_mlx_lm`` = kvchat time / mlx-lm time (goal
  <= 1.5, aim 1.0); ``vs_plain_read`` = plain read time / kvchat time (goal
  >= 0.6). The first call of each side is an untimed warm-up (and checks that
  kvchat's loaded planes equal mlx-lm's).
- FIRST SAVE: kvchat ``SessionStore.save`` of a new session name each round
  (durable: every file fsynced) in a store of its own, vs mlx-lm
  ``save_prompt_cache`` followed by one fsync of its file. Alternating, best of
  --rounds and median; files are deleted between rounds (kvchat:
  ``store.remove(name)`` then ``store.gc()``). Goal kvchat/mlx-lm <= 1.5.

(a) Autosave: a session is saved, then each turn adds 64 tokens and is saved
    again; the timed save is that second one. At 256 and 8,192 tokens of
    context in fp16 and fp32: the ratio is the point (goal at most 1.5).
(c) A chat saved turn by turn: at the largest context, fp16 and q4, a
    session saved after every 512 tokens (a pack per save, as a chat grows)
    loaded warm beside the same KV saved at once (one pack) and mlx-lm's
    load of it; sides alternating, best of --rounds.
(b) Resume vs re-prefill, only with --resume (the re-prefill takes minutes on
    a small CPU), with the embedded model (or --model): a session of N tokens
    (random K/V in the model's exact shape and dtype) is saved and loaded back
    into the engine's caches; re-prefill is the same N tokens run through the
    model in the engine's 512-token chunks. Prefill beyond --prefill-measure tokens is
    estimated from a linear fit of chunk time vs context over the measured
    chunks, flagged ``"prefill_s_estimated": true``.

Files live in a temporary directory made with ``tempfile.mkdtemp()`` (under
/tmp, or $TMPDIR). The JSON goes to stdout and to --out (default
benchmarks/results/sessions.json; with --quick only where --out is given).
The load average at the start and the end is recorded: other work on the
machine shows up in every number here.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_cache  # noqa: E402,F401  (first: sets up the CPU BLAS before mlx.core loads)
import mlx.core as mx  # noqa: E402

from mlx_cache import CacheConfig, FullKVCache, make_caches, make_layer_cache  # noqa: E402
from mlx_cache.backend import keep_freed_buffers  # noqa: E402
from mlx_cache.store import SessionStore  # noqa: E402

keep_freed_buffers()  # as kvchat does when it loads a model (models.load.load_model); mlx-lm's side gains from it too

SMOLLM2 = dict(layers=30, kv_heads=3, head_dim=64)  # SmolLM2-135M's KV shape
TURN = 64  # tokens a turn adds in part (a)
TURN_BY_TURN = 512  # tokens each save adds in part (c): a question and its answer
WARMUP = 2  # untimed turns first: the initial save's writeback still competes for the disk
CHUNK = 512  # the engine's prefill chunk
GROUP, BITS = 64, 4  # the q4 configuration on both sides
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sessions.json"
MESSAGES = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
GOALS = {"load_kvchat_vs_mlx_lm_max": 1.5, "load_vs_plain_read_min": 0.6, "first_save_kvchat_vs_mlx_lm_max": 1.5}


def log(obj: Any) -> None:
    print(obj if isinstance(obj, str) else json.dumps(obj), file=sys.stderr, flush=True)


# -- files: eviction, residency, plain read ---------------------------------------------
def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only: os.sync() ran after the writes)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None where that cannot be asked."""
    if _LIBC is None:
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = -(-size // page)
                vec = (ctypes.c_ubyte * n)()
                if _LIBC.mincore(addr, size, vec) != 0:
                    return None
                total += n
                resident += sum(b & 1 for b in vec)
            finally:
                _LIBC.munmap(addr, size)
        finally:
            os.close(fd)
    return round(resident / total, 4) if total else None


def plain_read(paths: list[Path], sizes: list[int], buf: bytearray) -> None:
    """Read every file, one after another, into `buf` (sized to hold them all)."""
    view = memoryview(buf)
    off = 0
    for p, size in zip(paths, sizes):
        with open(p, "rb", buffering=0) as f:
            end = off + size
            while off < end:
                n = f.readinto(view[off:end])
                if not n:
                    raise OSError(f"{p} is shorter than {size} bytes")
                off += n


def session_files(store: SessionStore, name: str) -> list[Path]:
    """kvchat's files of one session: the index, then each pack (or block file) it names, in token order."""
    index_path = store.sessions_dir / f"{name}.json"
    index = json.loads(index_path.read_text())
    kv = index["kv"]
    files = [store.blocks_dir / b["file"] for b in kv.get("packs", kv["blocks"])]
    for extra in (kv.get("window"), kv.get("checkpoint")):
        if extra and extra.get("file"):
            files.append(store.blocks_dir / extra["file"])
    return [index_path, *files]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- caches -----------------------------------------------------------------------------
def fill(caches: list, n: int, kv_heads: int, head_dim: int, dtype: mx.Dtype, seed: int = 0, twins: list | None = None) -> None:
    """Append `n` random tokens of K/V to every layer in 512-token chunks (like a prefill).

    `twins` (one cache per layer, e.g. mlx-lm's) get the very same chunks.
    """
    mx.random.seed(seed)
    done = 0
    while done < n:
        m = min(CHUNK, n - done)
        for i, c in enumerate(caches):
            k = mx.random.normal((1, kv_heads, m, head_dim)).astype(dtype)
            v = mx.random.normal((1, kv_heads, m, head_dim)).astype(dtype)
            c.update_and_fetch(k, v)
            if twins is not None:
                twins[i].update_and_fetch(k, v)
        mx.eval([(c.keys, c.values) for c in caches], [(t.keys, t.values) for t in twins or []])
        done += m


def _planes(x: Any) -> tuple[mx.array, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def same_planes(ours: list, theirs: list, n: int) -> bool:
    """Whether kvchat's caches and mlx-lm's hold bitwise the same first `n` tokens."""
    for a, b in zip(ours, theirs):
        for pa, pb in ((a.keys, b.keys), (a.values, b.values)):
            pa, pb = _planes(pa), _planes(pb)
            if len(pa) != len(pb):
                return False
            for x, y in zip(pa, pb):
                if x.dtype != y.dtype or not mx.array_equal(x[..., :n, :], y[..., :n, :]).item():
                    return False
    return True


def mlx_lm_caches(quantized: bool) -> list:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return [QuantizedKVCache(group_size=GROUP, bits=BITS) if quantized else KVCache() for _ in range(SMOLLM2["layers"])]


# -- timing -----------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(sides: dict[str, Callable[[], Any]], rounds: int, before: dict[str, Callable[[], Any]] | None = None,
              after: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per round for each side; the order rotates each round. `before`/`after` run untimed around each call."""
    names = list(sides)
    times: dict[str, list[float]] = {s: [] for s in names}
    for r in range(rounds):
        for s in names[r % len(names):] + names[: r % len(names)]:
            if before and s in before:
                before[s]()
            times[s].append(timed(sides[s]))
            if after and s in after:
                after[s]()
    return times


def stats(times: list[float]) -> dict[str, Any]:
    return {"best_ms": round(min(times) * 1e3, 2), "median_ms": round(statistics.median(times) * 1e3, 2),
            "all_ms": [round(t * 1e3, 2) for t in times]}


def load_summary(times: dict[str, list[float]]) -> dict[str, Any]:
    k, m, p = (stats(times[s]) for s in ("kvchat", "mlx_lm", "plain_read"))
    return {
        "kvchat": k, "mlx_lm": m, "plain_read": p,
        "kvchat_vs_mlx_lm": round(k["best_ms"] / m["best_ms"], 3),
        "kvchat_vs_mlx_lm_median": round(k["median_ms"] / m["median_ms"], 3),
        "vs_plain_read": round(p["best_ms"] / k["best_ms"], 3),
        "vs_plain_read_median": round(p["median_ms"] / k["median_ms"], 3),
        "kvchat_mb_per_s": None, "plain_read_mb_per_s": None,  # filled by the caller (needs the bytes)
    }


# -- the main part: kvchat beside mlx-lm and a plain read -------------------------------
def compare(kind: str, n: int, rounds: int, work: Path) -> dict[str, Any]:
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    quantized = kind == "q4"
    config = CacheConfig(k_bits=BITS, v_bits=BITS, group_size=GROUP) if quantized else CacheConfig()
    layers, heads, dim = SMOLLM2["layers"], SMOLLM2["kv_heads"], SMOLLM2["head_dim"]
    ours = [make_layer_cache(config) for _ in range(layers)]
    theirs = mlx_lm_caches(quantized)
    fill(ours, n, heads, dim, mx.float16, seed=n, twins=theirs)
    same = same_planes(ours, theirs, n)
    tokens = list(range(n))

    def kv_save(store: SessionStore, name: str) -> None:
        store.save(name, messages=MESSAGES, tokens=tokens, caches=ours, cache_config=config, model_name="bench",
                   model_fingerprint="bench", sampling={}, title=name)

    # FIRST SAVE: a store of its own (blocks are content-addressed: a store already holding
    # these tokens would share its blocks instead of writing them)
    save_store = SessionStore(work / "save-kvchat")
    save_dir = work / "save-mlx-lm"
    save_dir.mkdir()
    counter = {"kvchat": 0, "mlx_lm": 0}
    leftover: list[int] = []

    def kvchat_save() -> None:
        kv_save(save_store, f"s{counter['kvchat']}")

    def kvchat_clean() -> None:
        save_store.remove(f"s{counter['kvchat']}")
        save_store.gc()
        leftover.append(len(os.listdir(save_store.blocks_dir)))
        counter["kvchat"] += 1

    def mlx_path() -> Path:
        return save_dir / f"s{counter['mlx_lm']}.safetensors"

    def mlx_save() -> None:
        save_prompt_cache(str(mlx_path()), theirs)
        fsync_file(mlx_path())

    def mlx_clean() -> None:
        mlx_path().unlink()
        counter["mlx_lm"] += 1

    save_times = alternate({"kvchat": kvchat_save, "mlx_lm": mlx_save}, rounds,
                           after={"kvchat": kvchat_clean, "mlx_lm": mlx_clean})
    ks, ms = stats(save_times["kvchat"]), stats(save_times["mlx_lm"])
    first_save = {"kvchat": ks, "mlx_lm_fsync": ms, "kvchat_vs_mlx_lm": round(ks["best_ms"] / ms["best_ms"], 3),
                  "kvchat_vs_mlx_lm_median": round(ks["median_ms"] / ms["median_ms"], 3),
                  "kvchat_blocks_left_after_remove_gc": max(leftover)}

    # the files the loads read
    store = SessionStore(work / "load-kvchat")
    kv_save(store, "s")
    mlx_file = work / "load-mlx-lm.safetensors"
    save_prompt_cache(str(mlx_file), theirs)
    del ours, theirs
    # Both sides then load in the same allocator state: the buffers the filling left in MLX's
    # cache (of other sizes) go, and each side's freed buffers are there for its next round.
    mx.clear_cache()
    os.sync()  # nothing dirty left, so eviction drops every page
    kv_files = session_files(store, "s")
    kv_sizes = [p.stat().st_size for p in kv_files]
    kv_bytes, mlx_bytes = sum(kv_sizes), mlx_file.stat().st_size
    buf = bytearray(kv_bytes)
    plain_read(kv_files, kv_sizes, buf)  # touch every page of the buffer once

    loaded: dict[str, list] = {}

    def kvchat_load() -> None:
        fresh = [make_layer_cache(config) for _ in range(layers)]
        store.load("s", fresh, model_fingerprint="bench", cache_config=config)
        mx.eval([(c.keys, c.values) for c in fresh])
        loaded["kvchat"] = fresh

    def mlx_load() -> None:
        cache = load_prompt_cache(str(mlx_file))
        mx.eval([c.state for c in cache])
        loaded["mlx_lm"] = cache

    def plain() -> None:
        plain_read(kv_files, kv_sizes, buf)

    sides = {"kvchat": kvchat_load, "mlx_lm": mlx_load, "plain_read": plain}
    for fn in sides.values():  # untimed warm-up, and a check of what kvchat loaded
        fn()
    loaded_equal = same_planes(loaded["kvchat"], loaded["mlx_lm"], n)
    offsets_ok = all(c.offset == n for c in loaded["kvchat"]) and all(c.offset == n for c in loaded["mlx_lm"])
    loaded.clear()
    clear = {s: loaded.clear for s in sides}
    warm = load_summary(alternate(sides, rounds, after=clear))

    files = {"kvchat": kv_files, "mlx_lm": [mlx_file], "plain_read": kv_files}
    evict(kv_files)
    evict([mlx_file])
    resident = {"kvchat_files": resident_fraction(kv_files), "mlx_lm_file": resident_fraction([mlx_file])}
    cold = load_summary(alternate(sides, rounds, before={s: (lambda f=f: evict(f)) for s, f in files.items()}, after=clear))
    cold["resident_after_evict"] = resident
    for summary in (warm, cold):
        summary["kvchat_mb_per_s"] = round(kv_bytes / 1e6 / (summary["kvchat"]["best_ms"] / 1e3), 1)
        summary["mlx_lm_mb_per_s"] = round(mlx_bytes / 1e6 / (summary["mlx_lm"]["best_ms"] / 1e3), 1)
        summary["plain_read_mb_per_s"] = round(kv_bytes / 1e6 / (summary["plain_read"]["best_ms"] / 1e3), 1)
    del buf
    return {
        "cache": "fp16" if not quantized else "q4", "config": config.to_dict(), "context_tokens": n,
        "kvchat_bytes": kv_bytes, "kvchat_files": len(kv_files), "mlx_lm_bytes": mlx_bytes,
        "same_data": same, "loaded_equal": loaded_equal and offsets_ok,
        "load": {"warm": warm, "cold": cold}, "first_save": first_save,
    }


def side_by_side(contexts: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for kind in ("fp16", "q4"):
        for n in contexts:
            work = Path(tempfile.mkdtemp(prefix="kvchat-bench-"))
            try:
                t = time.perf_counter()
                row = compare(kind, n, rounds, work)
                row["wall_s"] = round(time.perf_counter() - t, 1)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            rows.append(row)
            w, c, s = row["load"]["warm"], row["load"]["cold"], row["first_save"]
            log(f"{kind} {n}: {row['kvchat_bytes'] / 1e6:.1f} MB; load warm kvchat {w['kvchat']['best_ms']} ms, "
                f"mlx-lm {w['mlx_lm']['best_ms']} ms, plain {w['plain_read']['best_ms']} ms "
                f"(x{w['kvchat_vs_mlx_lm']}, vs plain {w['vs_plain_read']}); cold kvchat {c['kvchat']['best_ms']} ms, "
                f"mlx-lm {c['mlx_lm']['best_ms']} ms, plain {c['plain_read']['best_ms']} ms (x{c['kvchat_vs_mlx_lm']}, "
                f"vs plain {c['vs_plain_read']}); first save kvchat {s['kvchat']['best_ms']} ms, mlx-lm+fsync "
                f"{s['mlx_lm_fsync']['best_ms']} ms (x{s['kvchat_vs_mlx_lm']}); same data {row['same_data']}, "
                f"loaded equal {row['loaded_equal']}; {row['wall_s']} s")
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    worst_ratio = max(r["load"][h]["kvchat_vs_mlx_lm"] for r in rows for h in ("warm", "cold"))
    worst_plain = min(r["load"][h]["vs_plain_read"] for r in rows for h in ("warm", "cold"))
    worst_save = max(r["first_save"]["kvchat_vs_mlx_lm"] for r in rows)
    return {
        **GOALS,
        "load_kvchat_vs_mlx_lm_worst": worst_ratio,
        "load_vs_plain_read_worst": worst_plain,
        "first_save_kvchat_vs_mlx_lm_worst": worst_save,
        "load_vs_mlx_lm_met": worst_ratio <= GOALS["load_kvchat_vs_mlx_lm_max"],
        "load_vs_plain_read_met": worst_plain >= GOALS["load_vs_plain_read_min"],
        "first_save_met": worst_save <= GOALS["first_save_kvchat_vs_mlx_lm_max"],
        "all_data_checks_passed": all(r["same_data"] and r["loaded_equal"] for r in rows),
    }


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        w, c, s = r["load"]["warm"], r["load"]["cold"], r["first_save"]
        out.append({
            "cache": r["cache"], "context": r["context_tokens"], "kvchat_mb": round(r["kvchat_bytes"] / 1e6, 1),
            "mlx_lm_mb": round(r["mlx_lm_bytes"] / 1e6, 1),
            "warm_ms": [w["kvchat"]["best_ms"], w["mlx_lm"]["best_ms"], w["plain_read"]["best_ms"]],
            "warm_ratio": w["kvchat_vs_mlx_lm"], "warm_vs_plain": w["vs_plain_read"],
            "cold_ms": [c["kvchat"]["best_ms"], c["mlx_lm"]["best_ms"], c["plain_read"]["best_ms"]],
            "cold_ratio": c["kvchat_vs_mlx_lm"], "cold_vs_plain": c["vs_plain_read"],
            "save_ms": [s["kvchat"]["best_ms"], s["mlx_lm_fsync"]["best_ms"]], "save_ratio": s["kvchat_vs_mlx_lm"],
        })
    return out


# -- (a) autosave -----------------------------------------------------------------------
def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.iterdir()} if path.is_dir() else {}


def save(store: SessionStore, name: str, caches: list, n: int, config: CacheConfig) -> float:
    t = time.perf_counter()
    store.save(name, messages=[{"role": "user", "content": "x"}], tokens=list(range(n)), caches=caches,
               cache_config=config, model_name="bench", model_fingerprint="bench", sampling={}, title=name)
    return time.perf_counter() - t


def autosave_cost(contexts: list[int], dtype: mx.Dtype, repeats: int) -> dict:
    """Median save time after a 64-token turn at each context length.

    The sessions take turns (one timed save each per round), so disk and
    writeback noise falls on every context alike.
    """
    config = CacheConfig()
    tmps = [tempfile.TemporaryDirectory() for _ in contexts]
    try:
        runs = []
        for n, tmp in zip(contexts, tmps):
            store = SessionStore(Path(tmp.name))
            caches = [FullKVCache(config) for _ in range(SMOLLM2["layers"])]
            fill(caches, n, SMOLLM2["kv_heads"], SMOLLM2["head_dim"], dtype)
            first = save(store, "s", caches, n, config)
            runs.append({"n": n, "store": store, "caches": caches, "tokens": n, "first": first, "times": [], "written": []})
        for r in range(WARMUP + repeats):
            for run in runs:
                store, caches = run["store"], run["caches"]
                fill(caches, TURN, SMOLLM2["kv_heads"], SMOLLM2["head_dim"], dtype, seed=r + 1)
                run["tokens"] += TURN
                before = dir_bytes(store.blocks_dir)
                took = save(store, "s", caches, run["tokens"], config)
                if r < WARMUP:
                    continue
                run["times"].append(took)
                after = dir_bytes(store.blocks_dir)
                run["written"].append(sum(size for f, size in after.items() if f not in before)
                                      + (store.sessions_dir / "s.json").stat().st_size)
        rows = [{
            "context_tokens": run["n"],
            "first_save_s": round(run["first"], 4),
            "turn_save_s_median": round(statistics.median(run["times"]), 4),
            "turn_save_s_all": [round(t, 4) for t in run["times"]],
            "bytes_written_per_turn_median": int(statistics.median(run["written"])),
            "session_bytes": sum(dir_bytes(run["store"].blocks_dir).values()),
        } for run in runs]
    finally:
        for tmp in tmps:
            tmp.cleanup()
    ratio = rows[-1]["turn_save_s_median"] / rows[0]["turn_save_s_median"]
    return {"dtype": str(dtype).rsplit(".", 1)[-1], "tokens_per_turn": TURN, "warmup_turns": WARMUP, "rows": rows,
            f"ratio_{contexts[-1]}_vs_{contexts[0]}": round(ratio, 3)}


# -- (c) a chat saved turn by turn ------------------------------------------------------
def grown(kind: str, n: int, turn: int, rounds: int) -> dict[str, Any]:
    """Warm load of a session saved after every `turn` tokens (a pack per save) beside one saved at once and mlx-lm's."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    config = CacheConfig(k_bits=BITS, v_bits=BITS, group_size=GROUP) if kind == "q4" else CacheConfig()
    layers, heads, dim = SMOLLM2["layers"], SMOLLM2["kv_heads"], SMOLLM2["head_dim"]
    work = Path(tempfile.mkdtemp(prefix="kvchat-bench-"))
    try:
        ours = [make_layer_cache(config) for _ in range(layers)]
        theirs = mlx_lm_caches(kind == "q4")
        turns = SessionStore(work / "turns")
        done, save_s, written = 0, [], 0
        while done < n:
            fill(ours, turn, heads, dim, mx.float16, seed=done, twins=theirs)
            done += turn
            before = dir_bytes(turns.blocks_dir)
            t = time.perf_counter()
            turns.save("s", messages=MESSAGES, tokens=list(range(done)), caches=ours, cache_config=config,
                       model_name="bench", model_fingerprint="bench", sampling={}, title="s")
            save_s.append(time.perf_counter() - t)
            written += sum(size for f, size in dir_bytes(turns.blocks_dir).items() if f not in before)
        once = SessionStore(work / "once")
        once.save("s", messages=MESSAGES, tokens=list(range(n)), caches=ours, cache_config=config, model_name="bench",
                  model_fingerprint="bench", sampling={}, title="s")
        mlx_file = work / "mlx-lm.safetensors"
        save_prompt_cache(str(mlx_file), theirs)
        packs = len(turns.index("s")[0]["kv"]["packs"])
        kv_bytes = sum(dir_bytes(turns.blocks_dir).values())
        del ours, theirs
        mx.clear_cache()
        loaded: dict[str, list] = {}

        def kv_load(store: SessionStore, side: str) -> None:
            fresh = [make_layer_cache(config) for _ in range(layers)]
            store.load("s", fresh, model_fingerprint="bench", cache_config=config)
            mx.eval([(c.keys, c.values) for c in fresh])
            loaded[side] = fresh

        def mlx_load() -> None:
            cache = load_prompt_cache(str(mlx_file))
            mx.eval([c.state for c in cache])
            loaded["mlx_lm"] = cache

        sides = {"turn_by_turn": lambda: kv_load(turns, "turn_by_turn"), "saved_at_once": lambda: kv_load(once, "saved_at_once"),
                 "mlx_lm": mlx_load}
        for fn in sides.values():
            fn()
        equal = same_planes(loaded["turn_by_turn"], loaded["mlx_lm"], n) and same_planes(loaded["saved_at_once"], loaded["mlx_lm"], n)
        loaded.clear()
        times = alternate(sides, rounds, after={s: loaded.clear for s in sides})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    st = {s: stats(t) for s, t in times.items()}
    return {
        "cache": kind, "context_tokens": n, "tokens_per_save": turn, "packs": packs, "loaded_equal": equal,
        # what merging small packs costs the saves: KV bytes written over the chat's life per byte
        # kept, and the save times (the slowest is the one that merged the most)
        "kv_bytes": kv_bytes, "written_per_kept_byte": round(written / kv_bytes, 2),
        "save_ms_median": round(1e3 * statistics.median(save_s), 1), "save_ms_max": round(1e3 * max(save_s), 1),
        "warm": st,
        "turn_by_turn_vs_mlx_lm": round(st["turn_by_turn"]["best_ms"] / st["mlx_lm"]["best_ms"], 3),
        "saved_at_once_vs_mlx_lm": round(st["saved_at_once"]["best_ms"] / st["mlx_lm"]["best_ms"], 3),
        "turn_by_turn_vs_saved_at_once": round(st["turn_by_turn"]["best_ms"] / st["saved_at_once"]["best_ms"], 3),
    }


# -- (b) resume vs re-prefill -----------------------------------------------------------
def load_model_or_stand_in(spec: str | None):
    """The embedded model (or --model); without one, a random-weight model in its shape."""
    try:
        from models.load import load_model

        lm = load_model(spec)
        return lm.name, lm.model, None
    except Exception as e:  # no embedded model in this checkout / offline
        from mlx_lm.models import llama

        args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                               rope_theta=100000.0, tie_word_embeddings=True)
        mx.random.seed(0)
        model = llama.Model(args)
        mx.eval(model.parameters())
        return "random-weight SmolLM2-135M shape (fp32)", model, f"{type(e).__name__}: {e}"


def prefill_profile(model, n: int) -> list[tuple[int, float]]:
    """(context at chunk start, seconds) for each 512-token chunk of an n-token prefill."""
    caches = make_caches(model, CacheConfig())
    mx.random.seed(1)
    tokens = mx.random.randint(0, 1000, (1, n))
    out = []
    for start in range(0, n, CHUNK):
        t = time.perf_counter()
        model(tokens[:, start : start + CHUNK], cache=caches)
        mx.eval([c.keys for c in caches])
        out.append((start, time.perf_counter() - t))
    return out


def estimate_prefill(profile: list[tuple[int, float]], n: int) -> float:
    """Sum of predicted chunk times up to n from a least-squares line through the profile."""
    xs, ys = [p[0] for p in profile], [p[1] for p in profile]
    if len(xs) < 2:
        return ys[0] * n / CHUNK
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    base = mean_y - slope * mean_x
    return sum(max(base + slope * s, 0.0) * min(CHUNK, n - s) / CHUNK for s in range(0, n, CHUNK))


def resume_vs_prefill(spec: str | None, contexts: list[int], measure_upto: int) -> dict:
    name, model, fallback = load_model_or_stand_in(spec)
    probe = make_caches(model, CacheConfig())
    model(mx.array([[1, 2]]), cache=probe)
    kv_heads, head_dim, dtype = probe[0].n_kv_heads, probe[0].head_dim, probe[0].dtype
    measured = min(measure_upto, max(contexts))
    t = time.perf_counter()
    profile = prefill_profile(model, measured)
    prefill_measured_s = time.perf_counter() - t
    rows = []
    for kind, config in (("full", CacheConfig()), ("q4", CacheConfig(k_bits=4, v_bits=4))):
        for n in contexts:
            with tempfile.TemporaryDirectory() as tmp:
                store = SessionStore(Path(tmp))
                caches = make_caches(model, config)
                fill(caches, n, kv_heads, head_dim, dtype)
                save_s = save(store, "s", caches, n, config)
                del caches
                size = sum(dir_bytes(store.blocks_dir).values()) + (store.sessions_dir / "s.json").stat().st_size
                loads = []
                for _ in range(3):
                    fresh = make_caches(model, config)
                    t = time.perf_counter()
                    store.load("s", fresh, model_fingerprint="bench", cache_config=config)
                    mx.eval([c.keys for c in fresh])
                    loads.append(time.perf_counter() - t)
                    del fresh
                estimated = n > measured
                prefill_s = estimate_prefill(profile, n) if estimated else sum(s for c, s in profile if c < n)
                load_s = min(loads)
                rows.append({
                    "cache": kind, "context_tokens": n, "file_bytes": size, "first_save_s": round(save_s, 3),
                    "load_s": round(load_s, 4), "load_mb_per_s": round(size / load_s / 1e6, 1),
                    "prefill_s": round(prefill_s, 2), "prefill_s_estimated": estimated,
                    "resume_speedup": round(prefill_s / load_s, 1),
                })
                log(rows[-1])
    return {
        "model": name,
        "stand_in_because": fallback,
        "kv_dtype": str(dtype).rsplit(".", 1)[-1],
        "prefill_measured_tokens": measured,
        "prefill_measured_s": round(prefill_measured_s, 2),
        "prefill_chunk_profile": [{"context": c, "chunk_s": round(s, 3)} for c, s in profile],
        "prefill_estimate": f"chunks past {measured} tokens: linear fit of chunk time vs context",
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384],
                    help="context lengths (tokens) of the side-by-side part and of part (b)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per side in the side-by-side part (best and median)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: contexts 512 1024, 2 rounds, 3 autosave repeats, no part (b), JSON only to --out")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write the JSON (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--resume", action="store_true", help="also part (b), resume vs re-prefill (slow: minutes of prefill)")
    ap.add_argument("--model", default=None, help="model for part (b); default: the embedded model")
    ap.add_argument("--prefill-measure", type=int, default=4096, help="prefill tokens actually run in part (b)")
    ap.add_argument("--repeats", type=int, default=11, help="timed turns per context in part (a)")
    args = ap.parse_args()
    if args.quick:
        args.contexts = [512, 1024] if args.contexts == ap.get_default("contexts") else args.contexts
        args.rounds, args.repeats, args.resume = min(args.rounds, 2), min(args.repeats, 3), False
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    contexts = sorted(args.contexts)
    start = time.perf_counter()
    out: dict = {
        "benchmark": "sessions",
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_lm": __import__("mlx_lm").__version__,
        "device": str(mx.default_device()),
        "temp_dir": tempfile.gettempdir(),
        "shape": {**SMOLLM2, "kv_dtype": "float16", "q4": {"bits": BITS, "group_size": GROUP}, "fill_chunk": CHUNK},
        "rounds": args.rounds,
        "quick": args.quick,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    rows = side_by_side(contexts, args.rounds)
    out["goals"] = goals(rows)
    out["summary"] = summary_rows(rows)
    out["side_by_side"] = rows
    out["autosave"] = [autosave_cost([256, 8192], dtype, args.repeats) for dtype in (mx.float16, mx.float32)]
    log({a["dtype"]: a["ratio_8192_vs_256"] for a in out["autosave"]})
    out["turn_by_turn"] = [grown(kind, contexts[-1], TURN_BY_TURN, args.rounds) for kind in ("fp16", "q4")]
    log([(g["cache"], g["packs"], g["turn_by_turn_vs_mlx_lm"], g["saved_at_once_vs_mlx_lm"]) for g in out["turn_by_turn"]])
    if args.resume:
        out["resume"] = resume_vs_prefill(args.model, contexts, args.prefill_measure)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    argv = " ".join(sys.argv[1:])
    out["_command"] = "python benchmarks/bench_sessions.py" + (f" {argv}" if argv else "")
    out["_wall_s"] = round(time.perf_counter() - start, 1)
    out["_host"] = f"{platform.system()} {platform.machine()}"
    text = json.dumps(out, indent=1)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
