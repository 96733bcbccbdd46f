"""The `kvchat` command line: the chat app by default, plus ask, info, models, setup, sessions and bench.

Every user error ends as one sentence on stderr and exit code 2; a traceback
means a bug in kvchat. Each command group is a module of this package that
adds its own subparser; the flags they share are in ``flags``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# transformers prints a PyTorch notice at import that means nothing for MLX models.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .. import __version__  # noqa: E402
from .ask import add_ask_parser  # noqa: E402
from .bench import add_bench_parser  # noqa: E402
from .chat import add_setup_parser, cmd_tui  # noqa: E402
from .flags import EXIT_USAGE, Parser, UserError, add_cache_args, add_sampling_args  # noqa: E402
from .info import add_info_parser  # noqa: E402
from .models import add_models_parser  # noqa: E402
from .sessions import add_sessions_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The whole `kvchat` parser: the app's flags, then one subparser per command."""
    p = Parser(prog="kvchat", description="Chat with a local LLM in the terminal. With no command, opens the chat app.")
    p.add_argument("--version", action="version", version=f"kvchat {__version__}")
    p.add_argument("--model", "-m", help="model: a name from `kvchat models` (Ollama's qwen2.5:3b, LM Studio's publisher/model), HF repo id, MLX/HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--session", "-s", help="open (or create) this session in the app")
    add_cache_args(p)
    add_sampling_args(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_ask_parser(sub)
    add_info_parser(sub)
    add_setup_parser(sub)
    add_sessions_parser(sub)
    add_bench_parser(sub)
    add_models_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from models.errors import user_message

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
    try:
        code = cmd_tui(args) if args.command is None else args.handler(args)
    except UserError as e:
        print(f"kvchat: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # kvchat's own errors carry one-sentence messages; others are bugs
        said = user_message(e)
        if said is None:
            raise
        print(f"kvchat: {said}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _release_main_streams()
    return code


def _release_main_streams() -> None:
    # MLX leaves freeing a thread's streams to the program, the main thread's
    # too (see app.tui.mlx_thread.release_streams); `ask` decodes on this thread.
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_streams()


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
