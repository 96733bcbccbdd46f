"""Managing saved chats through the real CLI: safe exports, rm and gc, file systems without locks,
names in any letter case, and the strict index schema.

Chats are made with the real engine on a tiny random-weight model; the CLI runs
as a subprocess (KVCHAT_HOME pointing at a temp store), as a user would run it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_cache.store import SessionCorrupt, SessionInUse, SessionStore, StoreError
from mlx_cache.store.index import file_entries, index_bytes
from models.chat import Chat
from models.engine import Engine, Finished
from models.sample import GREEDY

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = GREEDY.with_(max_tokens=6)
LONG = "Answer in the voice of a patient teacher who explains every step. " * 9  # ~600 tokens: 2 blocks and a tail
OTHER = "Reply like a ship's captain writing the log, with the date first and the weather last. " * 7


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["llama"])


@pytest.fixture(scope="module")
def template(engine, tmp_path_factory) -> Path:
    """A store holding one session, 'trip': a long system prompt and one greedy turn."""
    home = tmp_path_factory.mktemp("template") / "home"
    chat = Chat.open(engine, SessionStore(home), "trip", sampling=SAMPLING)
    chat.set_system(LONG)
    turn(chat, "Hello there")
    chat.close()
    return home


@pytest.fixture
def home(template, tmp_path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(template, dst)
    return dst


def turn(chat: Chat, text: str) -> Finished:
    return [e for e in chat.send(text) if isinstance(e, Finished)][-1]


def kvchat(*args: str, home: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVCHAT_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def one_sentence(r: subprocess.CompletedProcess, *needles: str, after_progress: bool = False) -> str:
    """Exit 2 and one 'kvchat: ...' sentence on stderr (no traceback) containing every needle.

    With `after_progress`, progress lines ("Loading llama...") may come before it.
    """
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    if after_progress:
        assert not any(line.startswith("kvchat: ") for line in lines[:-1]), r.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("kvchat: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def digests(root: Path) -> dict[str, str]:
    """Every file of a store by path -> sha256 (lock files are empty and come and go)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def index_of(home: Path, name: str) -> dict:
    return json.loads((home / "sessions" / f"{name}.json").read_text())


def kv_files(home: Path, name: str) -> set[str]:
    return {e["file"] for e in file_entries(index_of(home, name))}


def block_files(home: Path) -> set[str]:
    return {p.name for p in (home / "blocks").iterdir() if p.suffix == ".safetensors"}


def index_names(home: Path) -> list[str]:
    return sorted(e for e in os.listdir(home / "sessions") if e.endswith(".json"))


def reopens(engine, home: Path, name: str) -> int:
    """Open the session with its KV (raises if it cannot) and return its message count."""
    chat = Chat.open(engine, SessionStore(home), name, create=False)
    try:
        assert chat.state.caches[0].offset == len(chat.state.tokens) > 0
        return len(chat.messages)
    finally:
        chat.close()


def hold_locks(home: Path, *names: str) -> subprocess.Popen:
    """Another process holding the locks of `names` until its stdin closes."""
    code = ("import sys; from mlx_cache.store import SessionStore; s = SessionStore(sys.argv[1]);"
            "held = [s.lock(n) for n in sys.argv[2:]]; print('locked', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(home), *names], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def release(child: subprocess.Popen) -> None:
    child.stdin.close()
    assert child.wait(timeout=30) == 0


# -- export: never inside the store, never over a file without --force, atomic -----------------


@pytest.mark.parametrize("args", [
    ("--format", "markdown", "-o", "{home}/sessions/trip.json"),  # the session's own index
    ("--format", "markdown", "-o", "{home}/sessions/trip.json", "--force"),  # --force does not open the store
    ("--format", "markdown", "-o", "{home}/sessions/../sessions/trip.json", "--force"),
    ("--format", "markdown", "-o", "{home}/sessions/trip (copy).md"),  # would pass for an index copy
    ("--format", "mlx-lm", "{home}/sessions"),  # a folder: {home}/sessions/trip.safetensors
    ("--format", "mlx-lm", "{home}/blocks/new", "--force"),  # gc would delete it
    ("--format", "markdown", "-o", "{home}/store.lock", "--force"),  # replacing it would break the store's lock
    ("--format", "markdown", "-o", "{alias}/trip.json", "--force"),  # a symlink to the sessions folder
], ids=["own-index", "own-index-force", "dotdot", "new-file", "sessions-folder", "blocks", "store-lock", "symlink"])
def test_export_into_the_store_is_refused(engine, home, tmp_path, args):
    (tmp_path / "alias").symlink_to(home / "sessions")
    before = digests(home)
    r = kvchat("sessions", "export", "trip", *(a.format(home=home, alias=tmp_path / "alias") for a in args), home=home)
    one_sentence(r, "inside the session store", "trip")
    assert digests(home) == before  # not a byte changed, nothing added
    assert reopens(engine, home, "trip") == 3


def test_export_never_replaces_a_file_without_force_and_replaces_atomically(home, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache

    out = tmp_path / "out" / "chat.md"
    out.parent.mkdir()
    out.write_text("mine")
    os.link(out, tmp_path / "keep.md")  # a second name for the same bytes
    one_sentence(kvchat("sessions", "export", "trip", "-o", out, home=home), "already exists", "--force")
    assert out.read_text() == "mine"

    r = kvchat("sessions", "export", "trip", "-o", out, "--force", home=home)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("# Hello there") and "## Assistant" in out.read_text()
    # replaced by a new file under the old name, not rewritten in place: the old bytes are intact
    assert (tmp_path / "keep.md").read_text() == "mine"
    assert sorted(os.listdir(out.parent)) == ["chat.md"]  # no temp file left behind

    cache_file = out.parent / "chat.safetensors"
    assert kvchat("sessions", "export", "trip", "--format", "mlx-lm", cache_file, home=home).returncode == 0
    first, inode = cache_file.read_bytes(), cache_file.stat().st_ino
    one_sentence(kvchat("sessions", "export", "trip", "--format", "mlx-lm", cache_file, home=home), "already exists")
    assert cache_file.read_bytes() == first and cache_file.stat().st_ino == inode
    assert kvchat("sessions", "export", "trip", "--format", "mlx-lm", cache_file, "--force", home=home).returncode == 0
    assert cache_file.stat().st_ino != inode and cache_file.read_bytes() == first  # same export, a new file
    assert load_prompt_cache(str(cache_file))[0].offset > 0
    assert sorted(os.listdir(out.parent)) == ["chat.md", "chat.safetensors"]


def test_export_beside_the_stores_folders_is_the_users(engine, home):
    """KVCHAT_HOME may be any folder: files beside sessions/ and blocks/ are not the store's."""
    before = digests(home)
    r = kvchat("sessions", "export", "trip", "-o", home, home=home)
    assert r.returncode == 0 and r.stdout.strip() == f"Wrote {home / 'trip.md'}"
    assert digests(home) == {**before, "trip.md": hashlib.sha256((home / "trip.md").read_bytes()).hexdigest()}
    assert reopens(engine, home, "trip") == 3


def test_export_over_a_hard_link_to_the_index_leaves_the_session_alone(engine, home, tmp_path):
    """A second name of the index outside the store: --force replaces that name, never the store's bytes."""
    alias = tmp_path / "trip-index.json"
    os.link(home / "sessions" / "trip.json", alias)
    before = digests(home)
    r = kvchat("sessions", "export", "trip", "-o", alias, "--force", home=home)
    assert r.returncode == 0, r.stderr
    assert alias.read_text().startswith("# Hello there")
    assert digests(home) == before and reopens(engine, home, "trip") == 3


def test_export_to_a_folder_writes_name_dot_extension(home, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    r = kvchat("sessions", "export", "trip", "-o", folder, home=home)
    assert r.returncode == 0 and r.stdout.strip() == f"Wrote {folder / 'trip.md'}"
    r = kvchat("sessions", "export", "trip", "--format", "mlx-lm", folder, home=home)
    assert r.returncode == 0 and r.stdout.strip() == f"Wrote {folder / 'trip.safetensors'}"
    assert sorted(os.listdir(folder)) == ["trip.md", "trip.safetensors"]
    # 'Trip' is the session 'trip', so the same file: refused, not a second Trip.md
    one_sentence(kvchat("sessions", "export", "Trip", "-o", folder, home=home), "trip.md", "already exists")
    r = kvchat("sessions", "export", "trip", "--format", "mlx-lm", tmp_path / "plain", home=home)
    assert r.returncode == 0 and (tmp_path / "plain.safetensors").is_file()  # mlx-lm picks the format by suffix
    (folder / "sub.safetensors").mkdir()
    one_sentence(kvchat("sessions", "export", "trip", "--format", "mlx-lm", folder / "sub", home=home), "folder")


@pytest.mark.parametrize("folder", ["/", "/proc"])
@pytest.mark.parametrize("fmt", ["mlx-lm", "markdown"])
def test_export_to_a_folder_that_cannot_be_written_is_one_sentence(home, folder, fmt):
    target = Path(folder) / ("trip.safetensors" if fmt == "mlx-lm" else "trip.md")
    before = digests(home)
    args = ("sessions", "export", "trip", "--format", fmt, *((folder,) if fmt == "mlx-lm" else ("-o", folder)))
    if folder == "/" and os.access("/", os.W_OK):
        # Root may write '/': run the export in a private mount namespace where '/' is mounted read-only.
        if shutil.which("unshare") is None:
            pytest.skip("'/' is writable here and there is no unshare(1) to make it read-only")
        env = dict(os.environ, KVCHAT_HOME=str(home))
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount -o remount,bind,ro / 2>/dev/null || exit 77; exec "$@"', "sh",
                            sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=120)
        if r.returncode == 77 or r.stderr.startswith("unshare:"):  # no mount namespaces for us here
            pytest.skip("'/' is writable here and cannot be mounted read-only for the test")
    else:
        r = kvchat(*args, home=home)
    one_sentence(r, str(target), "folder")
    assert not target.exists() and digests(home) == before


# -- rm and gc -------------------------------------------------------------------------------


def test_rm_frees_the_sessions_own_blocks_and_keeps_a_forks(engine, home):
    from mlx_cache.memory import format_bytes

    assert kvchat("sessions", "fork", "trip", "copy", home=home).returncode == 0
    chat = Chat.open(engine, SessionStore(home), "trip")
    turn(chat, "Keep going, and tell me more about it")
    chat.close()
    mine, fork = kv_files(home, "trip"), kv_files(home, "copy")
    own, shared = mine - fork, mine & fork
    assert own and shared and fork - mine  # the old tail is the fork's alone now
    own_bytes = sum((home / "blocks" / f).stat().st_size for f in own)

    r = kvchat("sessions", "rm", "trip", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Deleted trip and {len(own)} KV files ({format_bytes(own_bytes)})."
    assert block_files(home) == fork  # its own tail gone, everything the fork uses still there
    assert index_names(home) == ["copy.json"] and not (home / "sessions" / ".locks" / "trip.lock").exists()
    assert reopens(engine, home, "copy") == 3
    assert json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)["blocks_removed"] == 0

    r = kvchat("sessions", "rm", "copy", home=home)
    assert r.returncode == 0 and f"and {len(fork)} KV files" in r.stdout
    assert block_files(home) == set()


def test_rm_of_a_damaged_session_leaves_its_blocks_to_gc(home):
    files = kv_files(home, "trip")
    (home / "sessions" / "trip.json").write_text('{"format": "kvchat-session", "ver')  # truncated
    r = kvchat("sessions", "rm", "trip", home=home)
    assert r.returncode == 0 and r.stdout.strip() == "Deleted trip."
    assert block_files(home) == files  # the damaged index named them: kept until gc
    report = json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)
    assert report["blocks_removed"] == len(files) and block_files(home) == set()


def test_gc_clears_stale_lock_files_but_not_held_ones(home):
    locks = home / "sessions" / ".locks"
    (locks / "gone.lock").touch()  # a session removed by a killed process, or created and never saved
    assert (locks / "trip.lock").exists()  # the existing session's, nobody holds it
    child = hold_locks(home, "ghost")  # a new chat in another process, not saved yet
    here = SessionStore(home).lock("here")  # and one in this process
    try:
        r = kvchat("sessions", "gc", home=home)
        assert r.returncode == 0 and "and 1 stale lock file." in r.stdout
        assert sorted(os.listdir(locks)) == ["ghost.lock", "here.lock", "trip.lock"]
    finally:
        release(child)
        here.release()
    report = json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)
    assert report["stale_locks_removed"] == 2 and report["blocks_removed"] == 0
    assert sorted(os.listdir(locks)) == ["trip.lock"]
    assert SessionStore(home).read("trip").meta.tokens > 0


def test_gc_keeps_blocks_named_by_copies_of_indexes_and_says_so(engine, home):
    chat = Chat.open(engine, SessionStore(home), "walk", sampling=SAMPLING)
    chat.set_system(OTHER)
    turn(chat, "Log the morning")
    chat.close()
    trip, walk = kv_files(home, "trip"), kv_files(home, "walk")
    assert trip and walk and not trip & walk
    sessions = home / "sessions"
    raw_trip, raw_walk = (sessions / "trip.json").read_bytes(), (sessions / "walk.json").read_bytes()
    truncated_walk = raw_walk[: raw_walk.rindex(b".safetensors") + 40]
    copies = {
        "trip (conflicted copy).json": raw_trip,  # a sync tool's copy, valid
        "walk (Jo's conflicted copy 2024-01-01).json": truncated_walk,  # not even JSON
        "walk.json~": b"\x00\xff garbage " + raw_walk[5:],  # an editor's backup, damaged
    }
    for name, data in copies.items():
        (sessions / name).write_bytes(data)
    orphan = home / "blocks" / ("f" * 64 + ".safetensors")
    orphan.write_bytes(b"no index names this")

    r = kvchat("sessions", "rm", "trip", "walk", home=home)
    assert r.returncode == 0 and r.stdout.splitlines() == ["Deleted trip.", "Deleted walk."]  # the copies name their KV
    assert block_files(home) == trip | walk | {orphan.name}

    report = json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)
    assert report["blocks_removed"] == 1 and report["bytes_freed"] == len(b"no index names this")
    assert block_files(home) == trip | walk
    kept = report["kept_for_other_files"]
    assert set(kept) == trip | walk
    assert all(kept[f] == ["trip (conflicted copy).json"] for f in trip)
    assert all(kept[f] == ["walk (Jo's conflicted copy 2024-01-01).json", "walk.json~"] for f in walk)
    r = kvchat("sessions", "gc", home=home)
    assert r.returncode == 0 and f"Kept {len(trip | walk)} KV files" in r.stdout
    assert all(repr(name) in r.stdout for name in copies)
    assert SessionStore(home).names() == []  # copies are not sessions

    # A copy under a valid session name ("walk.sync-conflict-...") is a session, a damaged one:
    # listed as such, its KV kept, and gone once it is removed.
    for name in copies:
        (sessions / name).unlink()
    conflict = "walk.sync-conflict-20240101-120000-ABCDEFG"
    (sessions / f"{conflict}.json").write_bytes(truncated_walk)
    report = json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)
    assert report["blocks_removed"] == len(trip) and report["kept_for_other_files"] == {}
    assert block_files(home) == walk
    [(name, problem)] = SessionStore(home).broken()
    assert name == conflict and "damaged" in problem
    assert kvchat("sessions", "rm", conflict, home=home).returncode == 0
    report = json.loads(kvchat("sessions", "gc", "--json", home=home).stdout)
    assert report["blocks_removed"] == len(walk) and block_files(home) == set()


# -- a file system without working locks -----------------------------------------------------

# The child process installs a seccomp filter under which the kernel answers every flock(2)
# with the given errno, as NFS without a lock daemon (ENOLCK) or a FUSE or SMB mount without
# lock support (ENOTSUP) does. No Python is patched: the real syscall fails.
SECCOMP_PRELUDE = textwrap.dedent("""
    import ctypes, errno, os, platform, struct, sys
    ARCH = {"x86_64": (0xC000003E, 73), "aarch64": (0xC00000B7, 32)}
    audit_arch, nr_flock = ARCH[platform.machine()]
    def insn(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    LD_ABS, JEQ, RET, ALLOW = 0x20, 0x15, 0x06, 0x7FFF0000
    prog = b"".join([
        insn(LD_ABS, 4), insn(JEQ, audit_arch, 1, 0), insn(RET, ALLOW),
        insn(LD_ABS, 0), insn(JEQ, nr_flock, 0, 1), insn(RET, 0x00050000 | int(os.environ["FLOCK_ERRNO"])),
        insn(RET, ALLOW),
    ])
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(prog)
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
        sys.exit(77)
    import fcntl
    try:
        fcntl.flock(os.open(os.devnull, os.O_RDONLY), fcntl.LOCK_EX)
        sys.exit(78)  # the filter did not take
    except OSError as e:
        assert e.errno == int(os.environ["FLOCK_ERRNO"])
""")
# Runs each argv given as a JSON list through the CLI's main() in this one process (one start-up,
# not one per command) and prints [exit code, stdout, stderr] of each as JSON.
RUN_CLI = textwrap.dedent("""
    import contextlib, io, json
    from app.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
""")


def without_locks(code: str, *args: str, home: Path, flock_errno: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVCHAT_HOME=str(home), FLOCK_ERRNO=str(flock_errno))
    r = subprocess.run([sys.executable, "-c", SECCOMP_PRELUDE + code, *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    if r.returncode in (77, 78):
        pytest.skip("seccomp filters are not available here to make flock fail")
    return r


def cli_without_locks(*commands: tuple[str, ...], home: Path, flock_errno: int) -> list[subprocess.CompletedProcess]:
    r = without_locks(RUN_CLI, json.dumps([[str(a) for a in c] for c in commands]), home=home, flock_errno=flock_errno)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return [subprocess.CompletedProcess(c, code, out, err) for c, (code, out, err) in zip(commands, json.loads(r.stdout))]


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
                    reason="flock is made to fail with a Linux seccomp filter")
@pytest.mark.parametrize("flock_errno", [errno.ENOLCK, errno.ENOTSUP], ids=["ENOLCK", "ENOTSUP"])
def test_a_file_system_without_locks_is_one_sentence(tiny_model_dirs, home, tmp_path, flock_errno):
    before = digests(home)
    # `ask` first: main() frees the thread's MLX streams as it ends, which only the commands after
    # it that compute nothing with MLX can live with.
    writes = [("ask", "more", "-m", tiny_model_dirs["llama"], "--session", "trip", "--max-tokens", "2", "--temp", "0"),
              ("sessions", "rm", "trip"), ("sessions", "gc"), ("sessions", "rename", "trip", "x"),
              ("sessions", "fork", "trip", "y")]
    # Reading needs no lock: the session is still there to look at and to export.
    reads = [("sessions", "show", "trip"), ("sessions", "export", "trip", "-o", tmp_path / "t.md")]
    results = cli_without_locks(*writes, *reads, home=home, flock_errno=flock_errno)
    for r in results[: len(writes)]:
        one_sentence(r, "does not support file locks", os.strerror(flock_errno), "KVCHAT_HOME",
                     after_progress=r.args[0] == "ask")
    show, export = results[len(writes) :]
    assert show.returncode == 0 and "Hello there" in show.stdout
    assert export.returncode == 0 and (tmp_path / "t.md").read_text().startswith("# Hello there")
    assert digests(home) == before
    # The mapping itself, on a real descriptor whose flock fails.
    code = textwrap.dedent("""
        from mlx_cache.store import StoreError, locks
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        try:
            locks._flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, "/some/store")
        except StoreError as e:
            print(type(e).__name__, e)
    """)
    r = without_locks(code, tmp_path / "x.lock", home=home, flock_errno=flock_errno)
    assert r.returncode == 0 and r.stdout.startswith("StoreError The file system holding /some/store does not support")


# -- names that differ only in letter case ---------------------------------------------------


def test_names_differing_in_case_are_one_session(engine, home):
    store = SessionStore(home)
    assert store.resolve("Trip") == store.resolve("TRIP") == "trip" and store.exists("tRiP")
    assert store.read("Trip").meta.name == "trip"

    chat = Chat.open(engine, store, "Trip")  # opens 'trip', with its KV
    assert len(chat.messages) == 3 and chat.state.caches[0].offset == len(chat.state.tokens) > 0
    turn(chat, "And then?")  # saves
    chat.close()
    assert index_names(home) == ["trip.json"] and len(store.read("trip").messages) == 5
    assert "Trip.lock" not in os.listdir(home / "sessions" / ".locks")

    store.fork("TRIP", "Copy")
    assert index_names(home) == ["Copy.json", "trip.json"] and store.read("copy").meta.name == "Copy"
    with pytest.raises(StoreError, match="already exists"):
        store.fork("copy", "TRIP")
    with pytest.raises(StoreError, match="already exists"):
        store.rename("COPY", "Trip")
    assert index_names(home) == ["Copy.json", "trip.json"]

    store.rename("tRIP", "walk")
    assert index_names(home) == ["Copy.json", "walk.json"] and len(store.read("Walk").messages) == 5
    store.remove("COPY")
    assert index_names(home) == ["walk.json"]
    r = kvchat("sessions", "show", "WALK", home=home)
    assert r.returncode == 0 and r.stdout.startswith("name      walk\n")


def test_a_new_session_Trip_when_trip_exists_is_trip(tiny_model_dirs, home):
    r = kvchat("ask", "more please", "-m", tiny_model_dirs["llama"], "--session", "Trip", "--max-tokens", "3",
               "--temp", "0", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["reused_tokens"] > 0  # resumed trip's KV
    assert index_names(home) == ["trip.json"]
    shown = json.loads(kvchat("sessions", "show", "trip", "--json", home=home).stdout)
    assert [m["content"] for m in shown["messages"] if m["role"] == "user"] == ["Hello there", "more please"]


def test_rename_that_changes_only_the_case(engine, home):
    blocks = digests(home / "blocks")
    SessionStore(home).rename("trip", "Trip")
    assert index_names(home) == ["Trip.json"]
    assert SessionStore(home).read("trip").meta.name == "Trip"
    assert reopens(engine, home, "trip") == 3
    r = kvchat("sessions", "rename", "Trip", "TRIP", home=home)
    assert r.returncode == 0 and index_names(home) == ["TRIP.json"]
    assert digests(home / "blocks") == blocks and reopens(engine, home, "TRIP") == 3


def test_locks_on_Trip_and_trip_are_one_lock(home):
    store = SessionStore(home)
    with store.lock("Trip"):
        with pytest.raises(SessionInUse):
            store.lock("tRiP")
    child = hold_locks(home, "Trip", "Ghost")  # an existing session and one not saved yet
    try:
        for name in ("trip", "TRIP", "ghost", "GHOST"):
            with pytest.raises(SessionInUse, match="another kvchat window or process"):
                store.lock(name)
        one_sentence(kvchat("sessions", "rm", "trip", home=home), "another kvchat")
    finally:
        release(child)
    store.lock("trip").release()
    store.lock("ghost").release()


# -- the strict schema: malformed is damaged, even with a valid checksum -----------------------


def _set(path: str, value):
    def apply(body: dict) -> None:
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return apply


_DELETE = object()
MALFORMED = {
    "time-as-text": _set("created", "yesterday"),
    "offset-as-text": _set("kv.layers.0.offset", "407"),
    "negative-offset": _set("kv.layers.0.offset", -1),
    "negative-block-start": _set("kv.blocks.0.start", -1),
    "pack-without-checksum": _set("kv.packs.0.xxh3_128_mib", _DELETE),
    "pack-with-two-checksums": _set("kv.packs.0.xxh3_128", "0" * 32),
    "v3-index-with-a-v4-checksum": _set("version", 3),
    "pack-size-as-text": _set("kv.packs.0.bytes", "524728"),
    "pack-listed-twice": lambda body: body["kv"]["packs"].append(dict(body["kv"]["packs"][0])),
    "pack-shorter-than-its-block": _set("kv.packs.0.end", 1),
    "pack-start-inside-a-block": _set("kv.packs.0.start", 3),
    "block-naming-no-pack": _set("kv.blocks.0.file", "f" * 64 + ".safetensors"),
    "block-without-pack": _set("kv.blocks.0.file", _DELETE),
    "token-too-large": _set("tokens.5", 2**32),
    "negative-token": _set("tokens.5", -1),
    "token-as-float": _set("tokens.5", 1.5),
    "message-not-text": _set("messages.1.content", 5),
    "message-without-role": _set("messages.1.role", _DELETE),
    "messages-not-a-list": _set("messages", "hello"),
    "file-outside-the-store": _set("kv.packs.0.file", "../sessions/trip.json"),
    "file-far-outside": _set("kv.packs.0.file", "../../../../etc/passwd"),
    "title-null": _set("title", None),
    "unknown-float-type": _set("kv.dtype", "int8"),
    "unknown-layer-kind": _set("kv.layers.0.kind", "mystery"),
    "bad-cache-config": _set("cache_config.kind", "mystery"),
    "tokens-beyond-the-blocks": lambda body: body["tokens"].append(7),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_index_with_a_valid_checksum_is_damaged(engine, home, case):
    path = home / "sessions" / "trip.json"
    body = json.loads(path.read_bytes())
    body.pop("checksum")
    MALFORMED[case](body)
    path.write_bytes(index_bytes(body))  # a correct checksum over the malformed body
    before = digests(home)
    store = SessionStore(home)
    with pytest.raises(SessionCorrupt, match=r"Session 'trip' is damaged \(its index is malformed: "):
        store.read("trip")
    with pytest.raises(SessionCorrupt, match="malformed"):
        Chat.open(engine, store, "trip")
    one_sentence(kvchat("sessions", "show", "trip", home=home), "'trip' is damaged", "malformed", "sessions rm trip")
    assert store.list() == [] and [name for name, _ in store.broken()] == ["trip"]
    assert digests(home) == before  # refused, not repaired or removed


def test_kv_file_names_are_found_in_any_text_exactly_as_the_pattern_finds_them():
    """gc and deletes keep every file an index-like file names; the fast scan must find what the pattern does."""
    import random
    import re

    from mlx_cache.store.manage import names_in_text

    pattern = re.compile(rb"(?:[0-9a-f]{64}(?:-[0-9a-f]{16})?|[wc]-(?:[0-9a-f]{64}|[0-9a-f]{32}))\.safetensors")
    rng = random.Random(7)
    pieces = [b".safetensors", b"w-", b"c-", b"-", b"\"", rng.randbytes(32).hex().encode(), rng.randbytes(8).hex().encode(),
              rng.randbytes(16).hex().encode()]
    found = 0
    for _ in range(4000):
        raw = b"".join(rng.choice(pieces) if rng.random() < 0.7 else bytes(rng.choice(b"0123456789abcdefwc-. x")
                                                                              for _ in range(rng.randint(1, 5)))
                       for _ in range(rng.randint(1, 14)))
        want = {m.decode() for m in pattern.findall(raw)}
        assert names_in_text(raw) == want, raw
        found += len(want)
    assert found > 200  # the texts did hold names
    key, h = "a" * 64, "b" * 16
    raw = f'["{key}.safetensors", "0{key}-{h}.safetensors", "w-{h * 2}.safetensors", "c-{key}.safetensors"]'.encode()
    assert names_in_text(raw) == {f"{key}.safetensors", f"{key}-{h}.safetensors", f"w-{h * 2}.safetensors",
                                  f"c-{key}.safetensors"}
