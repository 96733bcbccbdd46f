"""`kvchat sessions ...`: list, show, rename, rm, fork, export and gc saved chats."""

from __future__ import annotations

import argparse
import json
import os
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

    p = ss.add_parser(
        "export", help="export a session as Markdown or as an mlx-lm prompt cache",
        description="Export a session as Markdown, or its KV cache as an mlx-lm prompt cache that "
                    "'mlx_lm generate --prompt-cache-file OUT.safetensors --prompt ...' continues from. "
                    "The output never goes inside the session store and an existing file is replaced only "
                    "with --force; a folder as OUT means OUT/NAME.md or OUT/NAME.safetensors.",
    )
    p.add_argument("name")
    p.add_argument("out", nargs="?", help="output file or folder (required for mlx-lm; Markdown goes to stdout without it)")
    p.add_argument("--format", choices=["markdown", "mlx-lm"], default="markdown")
    p.add_argument("--output", "-o", dest="output", help="output file or folder (the same as OUT)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.add_argument(
        "--model", "-m", dest="model", metavar="MODEL",
        help="mlx-lm only: the model the session was made with (folder, .gguf file or Hugging Face repo id), "
             "checked against the session and written into the file so that mlx_lm generate loads it "
             "(then give mlx_lm no --model, or exactly the one written: a folder is written as its absolute "
             "path); default: the session's model where kvchat finds it (the embedded model, a repo id, "
             "or a folder of that name here)",
    )
    p.set_defaults(handler=cmd_export)

    p = ss.add_parser("gc", help="delete KV blocks no session references, temp files and stale locks")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_gc)


def _store() -> Any:
    from mlx_cache.store import SessionStore

    return SessionStore()


def _when(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # a finite time no calendar holds (year 10^292)
        return "unknown"


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
    from mlx_cache.store.export import target_path

    from .flags import UserError

    store = _store()
    out = args.output or args.out
    name = store.resolve(args.name)  # 'Trip' exports 'trip' as trip.md
    if args.format == "markdown":
        if args.model is not None:
            raise UserError("--model applies to --format mlx-lm only: Markdown names the model it was made with itself.")
        text = store.export_markdown(name)
        if not out:
            sys.stdout.write(text)
            return 0
        written = store.export_text(name, Path(out), text, ".md", force=args.force)
        print(f"Wrote {written}")
        return 0
    if not out:
        raise UserError("Exporting to mlx-lm needs an output file: kvchat sessions export NAME --format mlx-lm OUT.safetensors.")
    meta = store.read(name).meta
    target_path(store, name, Path(out), ".safetensors", force=args.force)  # refuse a bad target before finding the model
    model = _mlx_lm_model(meta, args.model)
    written = store.export_mlx_lm(name, Path(out), force=args.force, model=model)
    print(f"Wrote {written}")
    if model is None:
        print(f"kvchat: note: the file names its model {meta.model_name!r}, which is no model folder here, so "
              "'mlx_lm generate --prompt-cache-file' will not find it: export again with --model and the folder "
              "the session was made with.", file=sys.stderr)
    return 0


def _is_repo_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") == 1 and not Path(spec).expanduser().exists()


def _local_model_dir(spec: str | None) -> Path | None:
    """The MLX folder `spec` names on this machine, without downloading anything; None if there is none."""
    from models.embedded import EMBEDDED_NAME, embedded_model_dir
    from models.gguf import is_converted
    from models.load import resolve_model_dir

    if spec in (None, "", EMBEDDED_NAME):
        folder = embedded_model_dir()
        return folder if is_converted(folder) else None
    assert spec is not None
    if _is_repo_id(spec):
        try:
            from huggingface_hub import snapshot_download

            from models import load

            return Path(snapshot_download(spec, allow_patterns=getattr(load, "_HF_PATTERNS", None), local_files_only=True))
        except Exception:
            return None
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return resolve_model_dir(spec)[1] if path.is_file() else None  # converted once already, when the session was made
    return path if path.is_dir() and (path / "config.json").is_file() else None


def _mlx_lm_model(meta: Any, spec: str | None) -> str | None:
    """What an mlx-lm export names as its model: what `mlx_lm generate` should load to continue it.

    With `spec` (``--model``) it must be the session's model (same fingerprint)
    or the export is refused; a folder is written as its absolute path, a repo
    id as typed (mlx-lm finds it in the Hugging Face cache). Without it, the
    session's own model name is tried; None where it names nothing here.
    """
    from models.errors import ModelError
    from models.load import fingerprint

    from .flags import UserError

    if spec is not None:
        try:
            folder = _local_model_dir(spec)
        except ModelError as e:
            raise UserError(str(e)) from None
        if folder is None:
            if _is_repo_id(spec):
                return spec  # not downloaded here: mlx-lm fetches it; nothing to check it against
            raise UserError(f"No model at {spec}: give the model folder, .gguf file or repo id session {meta.name!r} was made with.")
        if fingerprint(folder) != meta.model_fingerprint:
            raise UserError(
                f"{spec} is not the model session {meta.name!r} was made with ({meta.model_name}): "
                "give that model's folder, .gguf file or repo id with --model."
            )
        return spec if _is_repo_id(spec) else os.path.abspath(folder)
    name = meta.model_name
    try:
        folder = _local_model_dir(name)
    except ModelError:
        folder = None
    if folder is not None and fingerprint(folder) == meta.model_fingerprint:
        return name if _is_repo_id(name) else os.path.abspath(folder)
    return name if _is_repo_id(name) else None  # a repo id is what mlx-lm loads anyway


def cmd_gc(args: argparse.Namespace) -> int:
    from mlx_cache.memory import format_bytes

    report = _store().gc()
    if args.json:
        print(json.dumps({"blocks_removed": report.removed, "bytes_freed": report.freed,
                          "stale_locks_removed": report.stale_locks, "kept_for_other_files": report.skipped}))
        return 0
    print(f"Removed {report.removed} unreferenced files ({format_bytes(report.freed)})"
          + (f" and {report.stale_locks} stale lock file{'s' if report.stale_locks != 1 else ''}."
             if report.stale_locks else "."))
    if report.skipped:
        holders = sorted({h for hs in report.skipped.values() for h in hs})
        print(f"Kept {len(report.skipped)} KV files that only {', '.join(repr(h) for h in holders)} "
              "names (not a session: rename it to NAME.json to open it, or delete it to free them).")
    return 0
