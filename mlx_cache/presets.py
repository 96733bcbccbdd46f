"""Named KV cache layouts users pick (`--kv-preset`, the settings screen), with what they were measured to cost.

Each preset is a quantized :class:`CacheConfig` built from the levers that
measured best on the embedded model (README, "Low-bit KV: quality"); the
numbers here are that table's at 4K tokens of context on the protocol's
16,384 tokens of text (``quality_protocol.json``), and the decode-speed
table's at 8K, so `kvchat info` and the settings screen can show them without
running anything (tests/test_kv_levers.py checks them against the JSON the
tables are made from).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import CacheConfig


@dataclass(frozen=True)
class Preset:
    """A named layout and its measured cost on SmolLM2-135M at 4,096 tokens (README's tables)."""

    name: str
    config: CacheConfig
    summary: str  # one line for menus
    bits: float  # effective bits per element at 4K (16-bit floats), everything counted
    ppl_pct: float  # perplexity vs the full cache, percent
    kl: float  # mean KL divergence from the full cache's next-token distribution (tells apart what noise in ppl hides)
    cpu_speed: float  # decode speed over plain q4's at 8K tokens on MLX's CPU backend (the presets speed benchmark)

    @property
    def note(self) -> str:
        """What it was measured to cost, in a few words (the settings form shows it beside the menu)."""
        return f"{self.ppl_pct:+.1f}% perplexity, CPU decode {self.cpu_speed:.2f}x q4"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "kv4",
            CacheConfig(k_bits=4, v_bits=3, keep_fp=4, fp_window=96, k_per_channel=True),
            "4-bit per-channel keys, 3-bit values, float sinks and last 96 tokens",
            bits=4.39, ppl_pct=0.41, kl=0.0059, cpu_speed=0.75,
        ),
        Preset(
            "kv4-fast",
            CacheConfig(k_bits=4, v_bits=2, keep_fp=4, fp_window=96, k_per_channel=True),
            "4-bit per-channel keys, 2-bit values, float sinks and last 96 tokens; no 3-bit codes, so it "
            "decodes at plain q4's speed on a CPU (kv4 is closer to full)",
            bits=3.89, ppl_pct=0.67, kl=0.0215, cpu_speed=1.06,
        ),
        Preset(
            "kv3",
            CacheConfig(k_bits=3, v_bits=2, keep_fp=4, fp_window=96, k_per_channel=True),
            "3-bit per-channel keys, 2-bit values, float sinks and last 96 tokens",
            bits=3.39, ppl_pct=1.78, kl=0.0327, cpu_speed=0.59,
        ),
    )
}

#: What `--kv-bits 4` (or 3) means when no other KV flag says otherwise.
DEFAULT_FOR_BITS = {4: "kv4", 3: "kv3"}


def preset_config(name: str, base: CacheConfig | None = None) -> CacheConfig:
    """The preset's layout on top of `base`'s kind, window and sinks (a rotating chat stays rotating)."""
    p = PRESETS[name].config
    if base is None or base.kind == "full":
        return p
    # per-channel keys need whole groups, which a window evicts one token at a time: per-token there
    return replace(
        p, kind=base.kind, window=base.window, sinks=base.sinks,
        keep_fp=min(p.keep_fp, base.sinks), fp_window=min(p.fp_window, base.window), k_per_channel=False,
    )


#: The quantization fields a preset sets (kind, window and sinks stay the user's).
_LAYOUT_FIELDS = ("k_bits", "v_bits", "group_size", "rotate", "keep_fp", "fp_window", "k_per_channel")


def preset_of(config: CacheConfig) -> str | None:
    """The preset whose quantization `config` has (on its own kind and window, as :func:`preset_config` makes it)."""
    for name in PRESETS:
        p = preset_config(name, config)
        if all(getattr(p, f) == getattr(config, f) for f in _LAYOUT_FIELDS):
            return name
    return None
