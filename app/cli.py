"""The `kvchat` command line: the TUI by default, plus ask, info, sessions and bench.

Every user error ends as one sentence on stderr and exit code 2; a traceback
means a bug in kvchat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

# transformers prints a PyTorch notice at import that means nothing for MLX models.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from mlx_cache.numbers import MAX_TOKEN_COUNT, parse_number  # noqa: E402

from . import __version__  # noqa: E402
from .kv_flags import KV_QUALITY_FLAGS, add_kv_quality_args, apply_kv_quality_flags, format_preset_rows, preset_rows  # noqa: E402

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: printed as one sentence, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints the whole usage
        ours = re.match(r"argument [^:]+: (--[\w-]+ .*)\Z", message, re.S)
        if ours:  # a sentence of our own from a flag's type function: it names the flag already
            self.exit(EXIT_USAGE, f"kvchat: {ours.group(1)}\n")
        message = message[0].upper() + message[1:]
        self.exit(EXIT_USAGE, f"kvchat: {message}. Run '{self.prog} --help' for the options.\n")


def _number(flag: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: the flag's value, finite and in [lo, hi], or one sentence naming both."""

    def parse(text: str) -> Any:
        return parse_number(text, flag, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open,
                            error=argparse.ArgumentTypeError)

    return parse


def _size(flag: str) -> Callable[[str], str]:
    """An argparse type for a memory size such as 2GB: checked, kept as text."""

    def parse(text: str) -> str:
        from mlx_cache.memory import parse_size

        try:
            value = parse_size(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a size above 0 such as 2GB, 512MB or 1073741824, not {text.strip() or repr(text)}."
            )
        return text

    return parse


def _cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", choices=["full", "rotating"], help="cache kind (default: full)")
    g.add_argument("--window", type=_number("--window", 1, MAX_TOKEN_COUNT, integer=True),
                   help="rotating: recent tokens kept (default 4096)")
    g.add_argument("--sinks", type=_number("--sinks", 0, MAX_TOKEN_COUNT, integer=True),
                   help="rotating: leading tokens never evicted (default 4)")
    g.add_argument("--kv-bits", type=_number("--kv-bits", 2, 8, integer=True),
                   help="quantize keys and values to B bits (2,3,4,6,8)")
    g.add_argument("--k-bits", type=_number("--k-bits", 2, 8, integer=True), help="bits for keys only")
    g.add_argument("--v-bits", type=_number("--v-bits", 2, 8, integer=True), help="bits for values only")
    g.add_argument("--kv-group-size", type=_number("--kv-group-size", 32, 128, integer=True),
                   help="quantization group size (32, 64, 128)")
    g.add_argument("--kv-keep-fp", type=_number("--kv-keep-fp", 0, MAX_TOKEN_COUNT, integer=True),
                   help="leading tokens kept unquantized")
    g.add_argument("--kv-rotate", action="store_true", default=None, help="Hadamard-rotate K/V before quantizing")
    add_kv_quality_args(g, _number, MAX_TOKEN_COUNT)
    g.add_argument("--kv-budget", type=_size("--kv-budget"),
                   help="KV memory budget such as 2GB (default: what the device can spare)")
    g.add_argument("--on-budget", choices=["rotate", "refuse"], default=None,
                   help="when a chat would exceed the budget: switch to a rotating window, or refuse")


CACHE_FLAGS = ("cache", "window", "sinks", "kv_bits", "k_bits", "v_bits", "kv_group_size", "kv_keep_fp", "kv_rotate",
               *KV_QUALITY_FLAGS)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=_number("--max-tokens", 1, MAX_TOKEN_COUNT, integer=True),
                   help="most tokens in the answer (default 512)")
    g.add_argument("--temp", type=_number("--temp", 0, 100), help="temperature; 0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=_number("--top-p", 0, 1, lo_open=True), help="nucleus sampling mass (default 0.95)")
    g.add_argument("--min-p", type=_number("--min-p", 0, 1, hi_open=True), help="min-p filter (default 0.05)")
    g.add_argument("--repetition-penalty", type=_number("--repetition-penalty", 0.01, 100),
                   help="penalty for recent tokens; 1 is off (default 1.1)")
    g.add_argument("--seed", type=_number("--seed", 0, 2**64 - 1, integer=True), help="seed for repeatable sampling")
    g.add_argument("--stop", action="append", default=None, help="extra stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvchat", description="Chat with a local LLM in the terminal. With no command, opens the chat app.")
    p.add_argument("--version", action="version", version=f"kvchat {__version__}")
    p.add_argument("--model", "-m", help="model: HF repo id, MLX/HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--session", "-s", help="open (or create) this session in the app")
    _cache_args(p)
    _sampling_args(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("ask", help="answer one prompt on stdout")
    a.add_argument("prompt", help="the question")
    a.add_argument("--model", "-m", dest="sub_model", help=argparse.SUPPRESS)
    a.add_argument("--system", help="system prompt")
    a.add_argument("--session", "-s", dest="sub_session", help="continue (or create) this saved session")
    a.add_argument("--json", action="store_true", help="print one JSON object with text, finish_reason and stats")
    _cache_args(a)
    _sampling_args(a)

    i = sub.add_parser("info", help="describe a model and what fits in memory")
    i.add_argument("--model", "-m", dest="sub_model", help=argparse.SUPPRESS)
    i.add_argument("--kv-budget", type=_size("--kv-budget"), help="KV memory budget such as 2GB")
    i.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("setup", help="fetch and convert the embedded model (done automatically on first use)")

    from .sessions_cli import add_sessions_parser

    add_sessions_parser(sub)
    from .bench_cli import add_bench_parser

    add_bench_parser(sub)
    return p


def _merged(args: argparse.Namespace, name: str) -> Any:
    """A flag given after the subcommand wins over the same flag before it."""
    sub = getattr(args, f"sub_{name}", None)
    return sub if sub is not None else getattr(args, name, None)


def cache_config_from(args: argparse.Namespace, base: Any = None) -> Any:
    """CacheConfig from flags (over `base`, e.g. saved settings)."""
    from mlx_cache import CacheConfig, CacheConfigError

    fields = dict(base.to_dict()) if base is not None else {}
    if getattr(args, "cache", None):
        fields["kind"] = args.cache
    if getattr(args, "window", None) is not None:
        fields["window"] = args.window
        fields.setdefault("kind", "rotating")
    if getattr(args, "sinks", None) is not None:
        fields["sinks"] = args.sinks
        fields.setdefault("kind", "rotating")
    if getattr(args, "kv_bits", None) is not None:
        fields["k_bits"] = fields["v_bits"] = args.kv_bits
    if getattr(args, "k_bits", None) is not None:
        fields["k_bits"] = args.k_bits
    if getattr(args, "v_bits", None) is not None:
        fields["v_bits"] = args.v_bits
    if getattr(args, "kv_group_size", None) is not None:
        fields["group_size"] = args.kv_group_size
    if getattr(args, "kv_keep_fp", None) is not None:
        fields["keep_fp"] = args.kv_keep_fp
    if getattr(args, "kv_rotate", None):
        fields["rotate"] = True
    try:
        return CacheConfig.from_dict(apply_kv_quality_flags(args, fields))
    except CacheConfigError as e:
        raise UserError(str(e)) from None


def sampling_from(args: argparse.Namespace, base: Any = None) -> Any:
    from models.sample import SamplingConfig

    base = base or SamplingConfig()
    changes: dict[str, Any] = {}
    for flag, name in (("max_tokens", "max_tokens"), ("temp", "temperature"), ("top_p", "top_p"),
                       ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"), ("seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "stop", None):
        changes["stop"] = tuple(args.stop)
    try:
        return base.with_(**changes)
    except ValueError as e:
        raise UserError(str(e)) from None


def kv_budget_from(args: argparse.Namespace) -> int | None:
    text = getattr(args, "kv_budget", None)
    if not text:
        return None
    from mlx_cache.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(str(e)) from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(spec: str | None) -> Any:
    from models.load import load_model

    from .heap import settle

    loaded = load_model(spec, progress=_progress)
    settle()  # the model lives as long as the command: keep it out of later collections
    return loaded


def make_engine(args: argparse.Namespace, loaded: Any) -> Any:
    from mlx_cache.memory import default_kv_budget
    from models.engine import Engine

    budget = kv_budget_from(args)
    if budget is None:
        budget = default_kv_budget(loaded.weights_bytes)
    return Engine(loaded, kv_budget=budget, on_budget=getattr(args, "on_budget", "rotate") or "rotate")


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
    session = _merged(args, "session")
    if session:
        from mlx_cache.store import check_name

        check_name(session)
    loaded = load(_merged(args, "model"))
    engine = make_engine(args, loaded)
    if session:
        from mlx_cache.store import SessionStore

        explicit = any(getattr(args, f, None) is not None for f in CACHE_FLAGS)
        chat = Chat.open(engine, SessionStore(), session, cache_config=cache_config if explicit else None)
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
        stats["cache"] = chat.usage()
        out = {"text": finished.text, "finish_reason": finished.reason, "stats": stats}
        if session:
            out["session"] = session
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mlx_cache import CacheConfig
    from mlx_cache.memory import default_kv_budget, format_bytes, max_context, max_window_in_budget
    from models.load import model_info

    loaded = load(_merged(args, "model"))
    info = model_info(loaded)
    budget = kv_budget_from(args)
    if budget is None:
        budget = default_kv_budget(loaded.weights_bytes)
    kinds = {
        "full": CacheConfig(),
        "q8": CacheConfig(k_bits=8, v_bits=8),
        "q4": CacheConfig(k_bits=4, v_bits=4),
        "rotating": CacheConfig(kind="rotating"),
        "rotating-q4": CacheConfig(kind="rotating", k_bits=4, v_bits=4),
    }
    fits: dict[str, Any] = {}
    windows: dict[str, int] = {}
    for label, cfg in kinds.items():
        if cfg.kind == "rotating":
            # A window never runs out of context; the budget bounds the window
            # (and the copy of it kept for "regenerate").
            fits[label] = "unbounded"
            windows[label] = max(0, min(cfg.window, max_window_in_budget(loaded.kv_shape, cfg, budget)))
            continue
        n = max_context(loaded.kv_shape, cfg, budget)  # the cache and a turn's prefill scratch
        if loaded.max_context:
            n = min(n, loaded.max_context)  # the model cannot attend further anyway
        fits[label] = n
    info["kv_budget_bytes"] = budget
    info["max_context_in_budget"] = fits
    info["max_window_in_budget"] = windows
    info["kv_presets"] = preset_rows(loaded.kv_shape, budget, loaded.max_context)
    if args.json:
        print(json.dumps(info))
        return 0
    rows = [
        ("model", info["name"]),
        ("path", info["path"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("weights", format_bytes(info["weight_bytes"])),
        ("layers", info["layers"]),
        ("KV heads", info["kv_heads"]),
        ("head dim", info["head_dim"]),
        ("KV bytes/token", f"{info['kv_bytes_per_token']:,} (full cache)"),
        ("max context", info["max_context"] or "unknown"),
        ("KV budget", format_bytes(budget)),
    ]
    for k, v in rows:
        print(f"{k:>16}  {v}")
    print("longest context in budget:")
    for label, n in fits.items():
        if label in windows:
            w = windows[label]
            sinks = kinds[label].sinks
            shown = f"unbounded, window {w:,} + {sinks} sinks" if w >= 1 else "none: no window fits this budget"
        else:
            shown = f"{n:,} tokens"
        print(f"{label:>16}  {shown}")
    print("\n".join(format_preset_rows(info["kv_presets"])))
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from models.embedded import ensure_embedded_model

    path = ensure_embedded_model(progress=_progress)
    print(f"Embedded model ready in {path}")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    from .tui import run_tui

    explicit = any(getattr(args, f, None) is not None for f in CACHE_FLAGS)
    return run_tui(
        model=args.model,
        cache_config=cache_config_from(args) if explicit else None,
        sampling=sampling_from(args) if any(getattr(args, f, None) is not None for f in ("max_tokens", "temp", "top_p", "min_p", "repetition_penalty", "seed", "stop")) else None,
        session=args.session,
        kv_budget=kv_budget_from(args),
        on_budget=args.on_budget,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from mlx_cache.config import CacheConfigError
    from models.errors import ModelError

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse cannot take an optional positional after an option
        # ("sessions export NAME --format mlx-lm OUT"): accept that one case.
        if (getattr(args, "sessions_command", None) == "export" and len(extras) == 1
                and not extras[0].startswith("-") and not args.out):
            args.out = extras[0]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    handlers = {"ask": cmd_ask, "info": cmd_info, "setup": cmd_setup}
    try:
        if args.command is None:
            code = cmd_tui(args)
        elif args.command in handlers:
            code = handlers[args.command](args)
        else:
            code = args.handler(args)
    except (UserError, ModelError, CacheConfigError) as e:
        print(f"kvchat: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # errors from the engine and the store carry one-sentence messages
        if _is_user_facing(e):
            print(f"kvchat: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        _release_main_streams()
    return code


def _release_main_streams() -> None:
    # MLX leaves freeing a thread's streams to the program, the main thread's
    # too (see app.tui.mlx_thread.release_streams); `ask` decodes on this thread.
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_streams()


def _is_user_facing(e: Exception) -> bool:
    from models.engine import EngineError

    if isinstance(e, EngineError):
        return True
    try:
        from mlx_cache.store import StoreError
    except ImportError:
        return False
    return isinstance(e, StoreError)


def run() -> None:
    """The `kvchat` command: main(), then leave without running C++ teardown.

    Everything kvchat writes is synced before it counts (sessions, settings),
    so nothing is lost by skipping interpreter teardown; what it skips is a
    race at exit between OpenBLAS's worker threads and the libraries unloading
    around them, which now and then hung the process or aborted it
    ("malloc_consolidate(): unaligned fastbin chunk detected") after its work
    was done. With one BLAS thread it never happened; without OpenBLAS neither.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse's exit 2, --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
