"""`kvchat models`: the models on this machine (embedded, Hugging Face cache, Ollama, LM Studio) and whether kvchat runs them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_models_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models", help="list the models on this machine (embedded, Hugging Face cache, Ollama, LM Studio)",
        description="List the models kvchat finds: the embedded model, the Hugging Face cache, Ollama's store "
                    "($OLLAMA_MODELS or ~/.ollama/models) and LM Studio's folders (~/.lmstudio/models, "
                    "~/.cache/lm-studio/models). The NAME column is what --model takes. Nothing is converted "
                    "or written; only headers are read. Sizes are in decimal units (1 MB = 10^6 bytes); QUANT is "
                    "the GGUF's own file type (Q4_1, Q4_K_M, ...), or an MLX model's bits.",
    )
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with every field; \"parameters\" is the number of weights, counted from "
                        "the GGUF tensor table or the safetensors headers (packed MLX weights as unpacked), and is "
                        "left out where those headers cannot tell it")
    p.add_argument("--all", action="store_true", help="also list models kvchat cannot run")
    p.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from mlx_cache.memory import format_bytes
    from models.discovery import discover

    found = discover()
    if args.json:
        print(json.dumps([m.to_dict() for m in found], indent=2))
        return 0
    shown = [m for m in found if m.runnable or args.all]
    hidden = len(found) - len(shown)
    rows = [("NAME", "SOURCE", "ARCH", "QUANT", "SIZE", "RUNS")]
    for m in shown:
        runs = "yes" if m.runnable else f"no: {m.reason}"
        if m.runnable and m.reason:
            runs = f"yes ({m.reason})"
        rows.append((m.name, m.source, m.architecture or "?", m.quant or "?",
                     format_bytes(m.size_bytes) if m.size_bytes else "-", runs))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    if hidden:
        print(f"({hidden} more that kvchat cannot run: kvchat models --all)", file=sys.stderr)
    return 0
