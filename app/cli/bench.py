"""`kvchat bench ...`: measurements a user can run on their own machine and model."""

from __future__ import annotations

import argparse
import json
from typing import Any

# The same values as models.quality's MAX_CHUNK and AGREEMENT_TOKENS (a test
# checks): importing that module here would load MLX for every `kvchat` command.
MAX_CHUNK = 64
AGREEMENT_TOKENS = 32


def add_bench_parser(sub: Any) -> None:
    """Add `bench` and its actions to the `kvchat` subparsers `sub`."""
    b = sub.add_parser("bench", help="measure KV cache quality on a model")
    bs = b.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True, parser_class=type(b))

    q = bs.add_parser(
        "quality",
        help="perplexity and greedy-answer agreement of full, q8, q4, q3 and rotated caches",
        description=(
            "Reads a shipped public-domain English text (2,705 SmolLM2 tokens) through each cache layout in chunks "
            f"(so later chunks attend over quantized keys and values) and compares the first "
            f"{AGREEMENT_TOKENS} greedy answer tokens of fixed chat prompts with the full cache's."
        ),
    )
    q.add_argument("--model", "-m", dest="sub_model", metavar="MODEL",
                   help="model (default: the embedded SmolLM2-135M-Instruct)")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    q.add_argument("--chunk", type=int, default=MAX_CHUNK,
                   help=f"tokens per forward pass while scoring the text, 1-{MAX_CHUNK} (default {MAX_CHUNK})")
    q.add_argument("--prompts", type=int, default=None,
                   help="how many of the 20 fixed prompts to answer (default all; 0 skips agreement)")
    q.set_defaults(handler=cmd_quality)


def cmd_quality(args: argparse.Namespace) -> int:
    """Run the quality benchmark and print a table (or JSON); returns the exit code.

    Missing a goal is a result, not an error: the exit code is 0 either way.
    """
    from models.progress import to_stderr

    from .flags import UserError, merged
    from .loading import load
    from models.quality import QUALITY_CONFIGS, quality_prompts, run_quality

    chunk = args.chunk
    if not 1 <= chunk <= MAX_CHUNK:
        raise UserError(
            f"--chunk must be between 1 and {MAX_CHUNK} tokens: the benchmark reads the text through "
            "the cache in small steps, the way a chat uses it."
        )
    prompts = quality_prompts()
    n = len(prompts) if args.prompts is None else args.prompts
    if not 0 <= n <= len(prompts):
        raise UserError(f"--prompts must be between 0 and {len(prompts)}.")
    loaded = load(merged(args, "model"))
    head_dim = loaded.kv_shape.head_dim
    if head_dim % 64 or head_dim & (head_dim - 1):
        raise UserError(
            f"This model's head dimension is {head_dim}: the benchmark's caches need a power of two "
            "that is a multiple of 64 (group size 64, Hadamard rotation)."
        )
    try:
        result = run_quality(loaded, QUALITY_CONFIGS, prompts=prompts[:n], chunk=chunk, progress=to_stderr)
    except ValueError as e:  # e.g. the text does not fit the model's context
        raise UserError(f"Cannot run the quality benchmark on this model: {e}.") from None
    if args.json:
        print(json.dumps(result))
    else:
        print(format_quality(result))
    return 0


def format_quality(result: dict[str, Any]) -> str:
    """The quality result as a plain-text table followed by the goals."""
    has_agreement = bool(result["prompts"])
    lines = [
        f"KV cache quality on {result['model']}: {result['text_tokens']:,}-token text in chunks of "
        f"{result['chunk']}"
        + (f"; {result['prompts']} prompts x {result['answer_tokens']} greedy tokens" if has_agreement else ""),
        "",
    ]
    header = f"{'cache':<12} {'perplexity':>10} {'vs full':>9}"
    if has_agreement:
        header += f" {'agreement':>10} {'identical':>10}"
    lines.append(header)
    for row in result["results"]:
        line = f"{row['name']:<12} {row['ppl']:>10.3f} {row['ppl_vs_full_pct']:>+8.2f}%"
        if has_agreement:
            line += f" {row['agreement'] * 100:>9.1f}% {row['identical_answers']:>4}/{result['prompts']:<5}"
        lines.append(line.rstrip())
    if result["goals"]:
        lines += ["", "goals:"]
        for g in result["goals"]:
            verdict = "PASS" if g["met"] else "MISS"
            lines.append(f"  {verdict}  {g['goal']}: {g['value']} ({g['margin']})")
    if has_agreement:
        lines += [
            "",
            "agreement: share of each answer's first tokens equal to the full cache's, up to the first "
            "difference; identical: answers equal in all of them.",
        ]
    return "\n".join(lines)
