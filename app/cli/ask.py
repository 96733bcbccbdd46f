"""`kvchat ask`: one answer on stdout (or one JSON object), optionally in a saved session."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from .flags import (
    CACHE_FLAGS,
    UserError,
    add_cache_args,
    add_sampling_args,
    cache_config_from,
    given,
    kv_budget_from,
    merged,
    sampling_from,
)
from .loading import load, make_engine


def add_ask_parser(sub: Any) -> None:
    """Add `ask` to the `kvchat` subparsers `sub`."""
    a = sub.add_parser("ask", help="answer one prompt on stdout")
    a.add_argument("prompt", help="the question")
    a.add_argument("--model", "-m", dest="sub_model", help=argparse.SUPPRESS)
    a.add_argument("--system", help="system prompt")
    a.add_argument("--session", "-s", dest="sub_session", help="continue (or create) this saved session")
    a.add_argument("--json", action="store_true", help="print one JSON object with text, finish_reason and stats")
    add_cache_args(a)
    add_sampling_args(a)
    a.set_defaults(handler=cmd_ask)


def cmd_ask(args: argparse.Namespace) -> int:
    from models.chat import Chat
    from models.engine import Finished, TextDelta

    prompt = args.prompt
    if not prompt.strip():
        raise UserError("The prompt is empty: pass the question in quotes, e.g. kvchat ask \"What is MLX?\".")
    # Validate everything cheap before the slow model load.
    cache_config = cache_config_from(args)
    sampling = sampling_from(args)
    kv_budget_from(args)
    session = merged(args, "session")
    store = None
    if session:
        from mlx_cache.store import SessionStore, check_name

        check_name(session)
        store = SessionStore()
        # A session open in another window is refused now, not after the model has loaded.
        store.lock(session).release()
    loaded = load(merged(args, "model"))
    engine = make_engine(args, loaded)
    if store is not None:
        explicit = given(args, CACHE_FLAGS)
        chat = Chat.open(engine, store, session, cache_config=cache_config if explicit else None)
        if chat.notice:
            print(f"kvchat: {chat.notice}", file=sys.stderr, flush=True)
        # The session keeps its own sampling; flags given now change it.
        chat.sampling = sampling_from(args, chat.sampling)
        if args.system:
            chat.set_system(args.system)
    else:
        chat = Chat(engine, cache_config, sampling, system=args.system)
    cancel = threading.Event()
    finished = None
    try:
        for event in chat.send(prompt, cancel):
            if isinstance(event, TextDelta) and not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Finished):
                finished = event
    except KeyboardInterrupt:
        cancel.set()
        return 130
    finally:
        chat.close()
    assert finished is not None
    if args.json:
        stats = finished.stats.to_dict()
        stats["cache"] = chat.usage().to_dict()
        out = {"text": finished.text, "finish_reason": finished.reason, "stats": stats}
        if session:
            out["session"] = session
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0
