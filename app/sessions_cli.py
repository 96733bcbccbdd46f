"""`kvchat sessions ...`: list, show, rename, rm, fork, export and gc saved chats."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_sessions_parser(sub: Any) -> None:
    s = sub.add_parser("sessions", help="manage saved chats")
    ss = s.add_subparsers(dest="sessions_command", metavar="ACTION", required=True, parser_class=type(s))

    p = ss.add_parser("list", help="list sessions, newest first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_list)

    p = ss.add_parser("show", help="show one session's details and conversation")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_show)

    p = ss.add_parser("rename", help="rename a session")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(handler=cmd_rename)

    p = ss.add_parser("rm", help="delete a session and the KV blocks no other session uses")
    p.add_argument("names", nargs="+")
    p.set_defaults(handler=cmd_rm)

    p = ss.add_parser("fork", help="copy a session instantly (shares its KV blocks)")
    p.add_argument("src")
    p.add_argument("new")
    p.set_defaults(handler=cmd_fork)

    p = ss.add_parser("export", help="export a session as Markdown or as an mlx-lm prompt cache")
    p.add_argument("name")
    p.add_argument("out", nargs="?", help="output file or folder (required for mlx-lm; Markdown goes to stdout without it)")
    p.add_argument("--format", choices=["markdown", "mlx-lm"], default="markdown")
    p.add_argument("--output", "-o", dest="output", help="output file or folder (the same as OUT)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(handler=cmd_export)

    p = ss.add_parser("gc", help="delete KV blocks no session references, temp files and stale locks")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_gc)


def _store() -> Any:
    from mlx_cache.store import SessionStore

    return SessionStore()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def cmd_list(args: argparse.Namespace) -> int:
    from mlx_cache.memory import format_bytes

    store = _store()
    metas = store.list()
    for name, problem in store.broken():  # shown, never hidden: the user may want to rescue them
        print(f"kvchat: skipped {name}: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps([
            {"name": m.name, "title": m.title, "model": m.model_name, "tokens": m.tokens,
             "bytes_on_disk": m.bytes_on_disk, "updated": m.updated, "cache": m.cache_config.label()}
            for m in metas
        ]))
        return 0
    if not metas:
        print("No sessions yet: 'kvchat ask \"...\" --session NAME' or the chat app creates one.")
        return 0
    print(f"{'NAME':<24} {'TITLE':<36} {'MODEL':<24} {'TOKENS':>7} {'SIZE':>9}  UPDATED")
    for m in metas:
        print(f"{m.name[:24]:<24} {m.title[:36]:<36} {m.model_name[:24]:<24} {m.tokens:>7} "
              f"{format_bytes(m.bytes_on_disk):>9}  {_when(m.updated)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    data = _store().read(args.name)
    m = data.meta
    if args.json:
        d = m.to_dict()
        d["messages"] = data.messages
        d["sampling"] = data.sampling
        print(json.dumps(d, default=str))
        return 0
    print(f"name      {m.name}\ntitle     {m.title}\nmodel     {m.model_name}\ncache     {m.cache_config.label()}")
    print(f"tokens    {m.tokens}\ncreated   {_when(m.created)}\nupdated   {_when(m.updated)}\n")
    for msg in data.messages:
        print(f"[{msg['role']}] {msg['content']}\n")
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    _store().rename(args.old, args.new)
    print(f"Renamed {args.old} to {args.new}.")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from mlx_cache.memory import format_bytes

    store = _store()
    for name in args.names:
        files, freed = store.remove(name)
        print(f"Deleted {name}" + (f" and {files} KV files ({format_bytes(freed)})." if files else "."))
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    _store().fork(args.src, args.new)
    print(f"Forked {args.src} as {args.new}.")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .cli import UserError

    store = _store()
    out = args.output or args.out
    if args.format == "markdown":
        text = store.export_markdown(args.name)
        if not out:
            sys.stdout.write(text)
            return 0
        written = store.export_text(args.name, Path(out), text, ".md", force=args.force)
        print(f"Wrote {written}")
        return 0
    if not out:
        raise UserError("Exporting to mlx-lm needs an output file: kvchat sessions export NAME --format mlx-lm OUT.safetensors.")
    written = store.export_mlx_lm(args.name, Path(out), force=args.force, model=_mlx_lm_model(store, args.name))
    print(f"Wrote {written}")
    return 0


def _mlx_lm_model(store: Any, name: str) -> str | None:
    """The model folder mlx-lm should load for an export: the session's model, resolved to an MLX folder."""
    model = store.read(name).meta.model_name
    try:
        from models.embedded import EMBEDDED_NAME
        from models.load import resolve_model_dir

        return str(resolve_model_dir(None if model == EMBEDDED_NAME else model)[1])
    except Exception:
        return None  # mlx-lm then needs --model; the session's own name is written


def cmd_gc(args: argparse.Namespace) -> int:
    from mlx_cache.memory import format_bytes

    report = _store().gc()
    if args.json:
        print(json.dumps({"blocks_removed": report.removed, "bytes_freed": report.freed,
                          "stale_locks_removed": report.stale_locks, "kept_for_other_files": report.skipped}))
        return 0
    print(f"Removed {report.removed} unreferenced files ({format_bytes(report.freed)})"
          + (f" and {report.stale_locks} stale lock files." if report.stale_locks else "."))
    if report.skipped:
        holders = sorted({h for hs in report.skipped.values() for h in hs})
        print(f"Kept {len(report.skipped)} KV files that only {', '.join(repr(h) for h in holders)} "
              "names (not a session: rename it to NAME.json to open it, or delete it to free them).")
    return 0
