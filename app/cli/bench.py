"""`kvchat bench ...`: measurements a user can run on their own machine and model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The same values as models.quality's (a test checks): importing that module
# here would load MLX for every `kvchat` command.
MAX_CHUNK = 64
CONTEXTS = (2048, 4096, 8192)
DEFAULT_TOKENS = 16384


def add_bench_parser(sub: Any) -> None:
    """Add `bench` and its actions to the `kvchat` subparsers `sub`."""
    b = sub.add_parser("bench", help="measure KV cache quality on a model")
    bs = b.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True, parser_class=type(b))

    q = bs.add_parser(
        "quality",
        help="perplexity, KL and top-1 agreement of each KV layout against the full cache",
        description=(
            "Reads a text (by default a shipped public-domain novel) through the full cache and every layout "
            f"under test in chunks of {MAX_CHUNK} tokens, in segments of each context length, and scores the "
            "second half of each segment: perplexity, its change against the full cache, mean KL divergence "
            "from the full cache's next-token distribution and top-1 agreement, with 95% intervals, and the "
            "effective bits per element of each layout."
        ),
    )
    q.add_argument("--model", "-m", dest="sub_model", metavar="MODEL",
                   help="model (default: the embedded SmolLM2-135M-Instruct)")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    q.add_argument("--text", metavar="FILE", help="score this UTF-8 text file instead of the shipped one")
    q.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), metavar="N,N",
                   help=f"context lengths, multiples of {MAX_CHUNK} (default {','.join(map(str, CONTEXTS))})")
    q.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"tokens of the text read at each context, in whole segments (default {DEFAULT_TOKENS:,})")
    q.add_argument("--layouts", metavar="NAME,NAME",
                   help="only these rows of the table (default all; 'full' always runs)")
    q.set_defaults(handler=cmd_quality)


def _contexts(text: str) -> tuple[int, ...]:
    from .flags import UserError

    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 2 * MAX_CHUNK or v % MAX_CHUNK for v in values):
        raise UserError(
            f"--contexts must be a comma-separated list of multiples of {MAX_CHUNK} from {2 * MAX_CHUNK} up, "
            f"such as 2048,4096, not {text!r}."
        )
    return values


def cmd_quality(args: argparse.Namespace) -> int:
    """Run the quality benchmark and print a table (or JSON); returns the exit code.

    Missing a goal is a result, not an error: the exit code is 0 either way.
    """
    from models.progress import to_stderr

    from .flags import UserError, merged
    from .loading import load

    contexts = _contexts(args.contexts)
    if args.tokens < min(contexts):
        raise UserError(f"--tokens must be at least the shortest context ({min(contexts):,}).")
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise UserError(f"Cannot read --text {args.text} ({reason}): give a UTF-8 text file.") from None
    from models.quality import QUALITY_CONFIGS, run_quality

    configs = dict(QUALITY_CONFIGS)
    if args.layouts:
        names = [n.strip() for n in args.layouts.split(",") if n.strip()]
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise UserError(f"Unknown layout {unknown[0]!r}: choose from {', '.join(repr(n) for n in configs)}.")
        configs = {n: configs[n] for n in names}
    loaded = load(merged(args, "model"))
    try:
        result = run_quality(loaded, configs, text=text, contexts=contexts, tokens=args.tokens, progress=to_stderr)
    except ValueError as e:  # e.g. the text is too short, or the model's context too small
        raise UserError(f"Cannot run the quality benchmark: {e}.") from None
    print(json.dumps(result) if args.json else format_quality(result))
    return 0


def _ci(lo_hi: list[float], fmt: str) -> str:
    return f"[{format(lo_hi[0], fmt)}, {format(lo_hi[1], fmt)}]"


def format_quality(result: dict[str, Any]) -> str:
    """The quality result as a plain-text table followed by the goals."""
    lines = [
        f"KV cache quality on {result['model']}: {result['text_tokens']:,}-token text, up to "
        f"{result['tokens_per_context']:,} tokens per context in chunks of {result['chunk']}; second half of each "
        "segment scored; [95% intervals]",
        "",
        f"{'context':>7} {'cache':<22} {'bits':>5} {'perplexity':>10} {'vs full':>8} {'[95%]':>17} "
        f"{'KL':>8} {'top-1':>7}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['context']:>7,} {r['name']:<22} {r['bits']:>5.2f} {r['ppl']:>10.3f} {r['ppl_vs_full_pct']:>+7.2f}% "
            f"{_ci(r['ppl_vs_full_ci'], '+.2f'):>17} {r['kl']:>8.4f} {r['top1'] * 100:>6.1f}%"
        )
    if result["goals"]:
        lines += ["", "goals:"]
        for g in result["goals"]:
            lines.append(f"  {'PASS' if g['met'] else 'MISS'}  {g['goal']}: {g['layout']}, {g['value']} ({g['margin']})")
    return "\n".join(lines)
