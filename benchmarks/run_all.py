"""Run every benchmark, keep its JSON, and write the README's result tables.

    python benchmarks/run_all.py                 # all benchmarks, then the tables
    python benchmarks/run_all.py --only cache    # one (or more) of them
    python benchmarks/run_all.py --report-only   # rewrite the tables from saved JSON

Each benchmark runs in a fresh process and prints one JSON object; it is kept
in benchmarks/results/NAME.json beside the command that made it. The README's
tables sit between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
markers and are rewritten from that JSON, so every number there can be traced
to a command and a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

#: name -> the command (run from the repository root with this Python)
COMMANDS: dict[str, list[str]] = {
    "cache": ["benchmarks/bench_cache.py"],
    "sessions": ["benchmarks/bench_sessions.py", "--resume"],
    "rotation_speed": ["benchmarks/bench_rotation_speed.py"],
    # 4K on one 4,096-token segment: what two shared CPU cores read in about an hour (the
    # default, 2K/4K/8K on 16,384 tokens, is for faster machines)
    "quality": ["-m", "app", "bench", "quality", "--json", "--contexts", "4096", "--tokens", "4096"],
    # the goal context on the protocol's 16,384 tokens (four segments): about an hour here too
    "quality_protocol": ["-m", "app", "bench", "quality", "--json", "--contexts", "2048,4096,8192", "--tokens", "16384"],
    "quality_gemma": ["benchmarks/bench_quality_gemma.py"],
    "kv_presets_speed": ["benchmarks/bench_kv_presets_speed.py"],
    "tui": ["benchmarks/bench_tui.py"],
    "markdown": ["benchmarks/bench_markdown.py"],
    "gguf": ["benchmarks/bench_gguf.py"],
    # a3f2143: the last commit before the window was drawn first
    "startup": ["benchmarks/bench_startup.py", "--before", "a3f2143", "--rounds", "7"],
}


def run(name: str) -> dict[str, Any]:
    cmd = [sys.executable, *COMMANDS[name]]
    print(f"== {name}: {' '.join(['python', *COMMANDS[name]])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True).stdout
    result = json.loads(out)
    result["_command"] = " ".join(["python", *COMMANDS[name]])
    result["_wall_s"] = round(time.perf_counter() - t, 1)
    result["_host"] = f"{platform.system()} {platform.machine()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def table_cache(r: dict[str, Any]) -> str:
    lines = [
        f"| context | cache | kvchat tok/s | mlx-lm tok/s | speed ratio | KV bytes/token ({r['kv_dtype']}) "
        "| vs full | vs 16-bit full |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["results"]:
        lines.append(
            f"| {row['context']:,} | {row['kind']} | {row['ours_tok_s']:.1f} | {row['mlx_lm_tok_s']:.1f} | "
            f"{row['speed_ratio']:.3f} | {row['kv_bytes_per_token']:,.0f} | {row['bytes_vs_full']:.2f}x | "
            f"{row['bytes_vs_16bit_full']:.2f}x |"
        )
    flat = r["rotating_memory_flat"]
    lines += [
        "",
        f"Rotating cache ({flat['window']} + {flat['sinks']} sinks) grown to {flat['tokens_seen']:,} tokens: "
        f"{_mib(flat['bytes_at_window'])} allocated when the window first filled, "
        f"{_mib(flat['bytes_at_end'])} at the end, {_mib(flat['max_bytes'])} at most.",
    ]
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms"


def table_sessions(r: dict[str, Any]) -> str:
    lines: list[str] = []
    rows = r.get("side_by_side")
    if rows:
        g = r["goals"]
        for heat, what in (("warm", "files in the page cache"), ("cold", "each side's files evicted first")):
            lines += [
                f"Load, {heat} ({what}); best of {r['rounds']}, sides alternating:",
                "",
                f"| cache | context | file MB (kvchat / mlx-lm) | kvchat load {heat} | mlx-lm load {heat} | plain read {heat} | "
                f"kvchat/mlx-lm (goal <= {g['load_kvchat_vs_mlx_lm_max']}) | vs plain read (goal >= {g['load_vs_plain_read_min']}) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for row in rows:
                x = row["load"][heat]
                lines.append(
                    f"| {row['cache']} | {row['context_tokens']:,} | {row['kvchat_bytes'] / 1e6:,.1f} / "
                    f"{row['mlx_lm_bytes'] / 1e6:,.1f} | {_ms(x['kvchat']['best_ms'])} | {_ms(x['mlx_lm']['best_ms'])} | "
                    f"{_ms(x['plain_read']['best_ms'])} | {x['kvchat_vs_mlx_lm']:.2f} | {x['vs_plain_read']:.2f} |"
                )
            lines.append("")
        lines += [
            f"First save of a new session; best of {r['rounds']}, sides alternating:",
            "",
            f"| cache | context | kvchat save | mlx-lm save + fsync | kvchat/mlx-lm (goal <= "
            f"{g['first_save_kvchat_vs_mlx_lm_max']}) |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            s = row["first_save"]
            lines.append(
                f"| {row['cache']} | {row['context_tokens']:,} | {_ms(s['kvchat']['best_ms'])} | "
                f"{_ms(s['mlx_lm_fsync']['best_ms'])} | {s['kvchat_vs_mlx_lm']:.2f} |"
            )
        lines += ["", "Autosave:", ""]
    lines += ["| KV dtype | context | save after a 64-token turn | bytes written | ratio vs 256 |",
              "|---|---:|---:|---:|---:|"]
    for a in r["autosave"]:
        base = a["rows"][0]["turn_save_s_median"]
        for row in a["rows"]:
            lines.append(
                f"| {a['dtype']} | {row['context_tokens']:,} | {row['turn_save_s_median'] * 1e3:.1f} ms | "
                f"{_mib(row['bytes_written_per_turn_median'])} | {row['turn_save_s_median'] / base:.2f} |"
            )
    grown = r.get("turn_by_turn")
    if grown:
        lines += [
            "",
            f"A chat saved turn by turn (a save every {grown[0]['tokens_per_save']} tokens, small packs merged as it "
            f"goes), warm; best of {r['rounds']}, sides alternating; the saves' cost beside it:",
            "",
            "| cache | context | packs | turn by turn | saved at once | mlx-lm | turn by turn / mlx-lm | "
            "at once / mlx-lm | KV written / kept | save, median | save, slowest |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in grown:
            w = g["warm"]
            cost = (f"{g['written_per_kept_byte']:.2f} | {g['save_ms_median']:.1f} ms | {g['save_ms_max']:.1f} ms"
                    if "written_per_kept_byte" in g else " | | ")
            lines.append(
                f"| {g['cache']} | {g['context_tokens']:,} | {g['packs']} | {_ms(w['turn_by_turn']['best_ms'])} | "
                f"{_ms(w['saved_at_once']['best_ms'])} | {_ms(w['mlx_lm']['best_ms'])} | "
                f"{g['turn_by_turn_vs_mlx_lm']:.2f} | {g['saved_at_once_vs_mlx_lm']:.2f} | {cost} |"
            )
    res = r.get("resume")
    if res:
        lines += [
            "",
            f"Resume vs re-prefill ({res['model']}, KV in {res['kv_dtype']}):",
            "",
            "| cache | context | file size | load | re-prefill | resume speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in res["rows"]:
            est = " (est.)" if row["prefill_s_estimated"] else ""
            lines.append(
                f"| {row['cache']} | {row['context_tokens']:,} | {_mib(row['file_bytes'])} | "
                f"{row['load_s'] * 1e3:.0f} ms | {row['prefill_s']:.1f} s{est} | {row['resume_speedup']:,.0f}x |"
            )
    return "\n".join(lines)


def table_rotation_speed(r: dict[str, Any]) -> str:
    lines = ["| context | bits | plain tok/s | rotated tok/s | rotated / plain | cost | goal (< 10%) |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for p in r["results"]:
        lines.append(
            f"| {p['context']:,} | {p['bits']} | {p['plain_tok_s']:.1f} | {p['rotated_tok_s']:.1f} | "
            f"{p['ratio']:.3f} | {p['rotation_cost_pct']:.1f}% | {'met' if p['goal_met'] else 'missed'} |"
        )
    paths = sorted({(p["plain_attention"], p["rotated_attention"]) for p in r["results"]})
    lines += ["", "Attention path (plain, rotated): " + "; ".join(f"{a}, {b}" for a, b in paths)
              + f". Full cache for reference: {r['full_tok_s']} tok/s by context."]
    return "\n".join(lines)


def table_quality(r: dict[str, Any]) -> str:
    contexts = sorted({row["context"] for row in r["results"]})
    per = r["tokens_per_context"]  # one number, or one per context where runs read different lengths
    read = (f"{per:,} tokens" if isinstance(per, int) else "tokens of the text (" + "; ".join(
        f"{v:,} at {int(k):,}" for k, v in sorted(per.items(), key=lambda kv: int(kv[0]))) + ")")
    lines = [
        f"{r['model']}: {r['text_tokens']:,}-token public-domain novel (models/data/botchan.txt); at each context, "
        f"the first {read} in whole segments, read in chunks of {r['chunk']} through "
        "the full cache and each layout in lockstep, the second half of each segment scored. "
        "Bits per element count everything at 16-bit floats; [95% intervals] over the 64-token chunks "
        "(the change vs full paired chunk by chunk).",
        "",
        "| context | cache | bits/element | perplexity | vs full [95%] | mean KL [95%] | top-1 agreement [95%] |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in contexts:
        for row in (x for x in r["results"] if x["context"] == n):
            lo, hi = row["ppl_vs_full_ci"]
            klo, khi = row["kl_ci"]
            tlo, thi = row["top1_ci"]
            lines.append(
                f"| {n:,} | {row['name']} | {row['bits']:.2f} | {row['ppl']:.3f} | "
                f"{row['ppl_vs_full_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] | {row['kl']:.4f} [{klo:.4f}, {khi:.4f}] | "
                f"{row['top1'] * 100:.1f}% [{tlo * 100:.1f}, {thi * 100:.1f}] |"
            )
    if r.get("goals"):
        lines.append("")
        for g in r["goals"]:
            lines.append(f"- {'Met' if g['met'] else 'Missed'}: {g['goal']}: {g['layout']}, {g['value']} ({g['margin']}).")
    return "\n".join(lines)


def table_kv_presets_speed(r: dict[str, Any]) -> str:
    lines = ["| context | preset | q4 tok/s | preset tok/s | preset / q4 (median of rounds) | rounds | by CPU time | goal (>= 0.90) |",
             "|---:|---|---:|---:|---:|---|---:|---|"]

    def row(p: dict[str, Any], goal: str) -> str:
        cpu = f"{p['cpu_ratio']:.3f}" if "cpu_ratio" in p else "-"
        return (f"| {p['context']:,} | {p['preset']} ({p['cache']}) | {p['q4_tok_s']:.1f} | {p['preset_tok_s']:.1f} | "
                f"{p['ratio']:.3f} | {', '.join(f'{x:.2f}' for x in p['round_ratios'])} | {cpu} | {goal} |")

    for p in r["results"]:
        lines.append(row(p, "met" if p["goal_met"] else "missed"))
    for p in r.get("levers_only", []):
        lines.append(row(p, "(diagnostic)"))
    lines += ["", f"{r['rounds']} alternating rounds of {r['steps']} greedy steps each; \"by CPU time\" is plain q4's "
              "CPU time per token over the preset's. \"levers only\": the preset with its 3-bit codes raised to 4 bits."]
    if r.get("kernels"):
        lines += ["", f"MLX's `quantized_matmul` for one layer at one decode step ({r.get('kv_dtype', 'the KV dtype')}, "
                  "median ms; per-token keys are plain caches' scores, per-channel keys the presets', values every "
                  "quantized cache's output; \"3 as 2 + 1\": 3-bit codes as a 2-bit and a 1-bit product, tried "
                  "and not kept):", "",
                  "| context | bits | scores, per-token keys | scores, per-channel keys | output, values |",
                  "|---:|---:|---:|---:|---:|"]
        for k in r["kernels"]:
            lines.append(f"| {k['context']:,} | {k['bits']} | {k['scores_per_token_keys_ms']:.2f} | "
                         f"{k['scores_per_channel_keys_ms']:.2f} | {k['output_values_ms']:.2f} |")
            if "as_2_plus_1_bits" in k:
                s = k["as_2_plus_1_bits"]
                lines.append(f"| {k['context']:,} | 3 as 2 + 1 | | {s['scores_per_channel_keys_ms']:.2f} | "
                             f"{s['output_values_ms']:.2f} |")
    return "\n".join(lines)


def table_tui(r: dict[str, Any]) -> str:
    def verdict(met: bool) -> str:
        return "met" if met else "missed"

    def ratio(key: str) -> str:
        # four places where three would round a miss (0.9495) up to the goal
        return f"{r[key]:.4f}"

    def spread(key: str) -> str:
        lo, hi = r.get(key, ["", ""])
        return f"{lo:.2f}-{hi:.2f}" if lo != "" else ""

    rows = [
        "| path | decode tok/s (median) | vs `kvchat ask` (median of per-round ratios) | rounds' ratios | goal >= 0.95 |",
        "|---|---:|---:|---:|---|",
        f"| `kvchat ask` | {r['ask_decode_tok_s']:.2f} | 1 | | |",
        f"| the app, headless (Pilot) | {r['app_decode_tok_s']:.2f} | {ratio('ratio')} | {spread('ratio_range')} | "
        f"{verdict(r['goal_met'])} |",
    ]
    if "long_chat_ratio" in r:
        rows.append(f"| the app, headless, {r['long_chat_exchanges']} earlier exchanges on screen | "
                    f"{r['long_chat_decode_tok_s']:.2f} | {ratio('long_chat_ratio')} | {spread('long_chat_ratio_range')} | "
                    f"{verdict(r['long_chat_goal_met'])} |")
    if "terminal_ratio" in r:
        rows.append(f"| the real `kvchat` in tmux | {r['terminal_decode_tok_s']:.2f} | {ratio('terminal_ratio')} | "
                    f"{spread('terminal_ratio_range')} | {verdict(r['terminal_goal_met'])} |")
    return "\n".join(rows + [
        "",
        f"{len(r['rounds'])} rounds, {r['max_tokens']} greedy tokens each, every run in a fresh process; "
        "the meter and the streaming Markdown on in every app run.",
    ])


def table_markdown(r: dict[str, Any]) -> str:
    rows = [
        "| answer | lines at 100 cells | laid out as the app does (ms per refresh) | whole answer laid out again (ms) | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["results"]:
        rows.append(f"| {row['tokens']:,} tokens | {row['lines']:,} | {row['grow_ms']:.2f} | {row['whole_ms']:.2f} | "
                    f"{row['whole_over_grow']:.1f}x |")
    return "\n".join(rows + [
        "",
        f"Pieces of {r['characters_per_refresh']} characters (~7 tokens, one CPU refresh); "
        f"mean of the last {r['last_refreshes']} refreshes of each answer.",
    ])


def table_gguf(r: dict[str, Any]) -> str:
    c, load = r["conversion"], r["load"]
    p = c["phases_s"]
    rows = [
        "| | measured | goal |",
        "|---|---:|---|",
        f"| weight repacking rate, nothing beside it | {c['weight_rate_alone_per_s'] / 1e6:.0f} M weights/s | |",
        f"| weight repacking rate while the tokenizer builds beside it | {c['weight_rate_per_s'] / 1e6:.0f} M weights/s | |",
        f"| whole conversion of {c['weights'] / 1e6:.0f} M weights (header {p['header']} s, weights {p['weights']} s, "
        f"write {p['write']} s, tokenizer {p['tokenizer_in_parallel']} s in parallel) | {c['seconds']} s | |",
        f"| a 3B Q4_K_M model, extrapolated (header + weights + write at the measured rates) | "
        f"**{c['extrapolated_3b_s']:.0f} s** ({c['extrapolated_3b_s_pessimistic']:.0f} s at the slower rate) | "
        f"under a minute: {'met' if c['extrapolated_3b_s_pessimistic'] < 60 else 'missed'} |",
        f"| loading the converted folder: kvchat / mlx-lm's `load` of the same folder | **{load['ratio']:.2f}x** "
        f"({load['kvchat_load_s']:.1f} s / {load['mlx_lm_load_s']:.1f} s) | as fast (within noise) |",
        f"| the same with kvchat's float32 expansion on the CPU (`models/cpu.py`) | {load['ratio_float32']:.2f}x | |",
        f"| Q6_K re-quantized to 8-bit groups of 64: total error / Q6_K's own | {r['rounding']['q6_k_total_vs_own']:.3f}x | |",
    ]
    return "\n".join(rows + ["", f"On {r['file']} ({r['file_bytes'] / 1e6:.0f} MB), best of {load['rounds']} loads."])


def table_startup(r: dict[str, Any]) -> str:
    def cell(side: str, key: str) -> str:
        runs = r[side][key]["runs_s"]
        return f"{r[side][key]['median_s']:.2f} s ({min(runs):.2f}-{max(runs):.2f})"

    sides = [s for s in ("before", "now") if s in r]
    rows = ["| | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    for key, label in (("first_frame", "launch to first frame (goal <= 1 s)"), ("ready", "launch to ready"),
                       ("ask", '`kvchat ask "Hi" --max-tokens 1`, whole process'),
                       ("ask_cpu", "the same, CPU time (user + system)")):
        if key not in r["now"]:
            continue
        rows.append(f"| {label} | " + " | ".join(cell(side, key) for side in sides) + " |")
    notes = [f"median (range) of {r['rounds']} rounds, sides alternating; the embedded model."]
    if "ask_now_over_before" in r:
        notes.append(f"`ask` now / before: {r['ask_now_over_before']:.2f} in wall time"
                     + (f", {r['ask_cpu_now_over_before']:.2f} in CPU time." if "ask_cpu_now_over_before" in r else "."))
    notes.append("First frame within 1 s: " + ("met." if r["first_frame_met"] else "missed."))
    return "\n".join(rows + ["", " ".join(notes)])


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "cache": table_cache,
    "sessions": table_sessions,
    "rotation_speed": table_rotation_speed,
    "quality": table_quality,
    "quality_protocol": table_quality,
    "quality_gemma": table_quality,
    "kv_presets_speed": table_kv_presets_speed,
    "tui": table_tui,
    "markdown": table_markdown,
    "startup": table_startup,
    "gguf": table_gguf,
}


def render(name: str, result: dict[str, Any]) -> str:
    device = result.get("device", "")
    footer = f"\n\n<sub>`{result['_command']}` on {result['_host']} ({device}); JSON in benchmarks/results/{name}.json.</sub>"
    return TABLES[name](result) + footer


def write_readme(names: list[str]) -> None:
    text = README.read_text()
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        block = render(name, json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- results:{name} -->).*?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"README has no results:{name} markers; skipped", file=sys.stderr)
            continue
        text = pattern.sub(lambda m: f"{m.group(1)}\n{block}\n{m.group(2)}", text)
    README.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(COMMANDS), help="run only these benchmarks")
    ap.add_argument("--report-only", action="store_true", help="rewrite README tables from saved JSON")
    args = ap.parse_args()
    names = args.only or list(COMMANDS)
    if not args.report_only:
        for name in names:
            run(name)
    write_readme(list(TABLES))


if __name__ == "__main__":
    main()
