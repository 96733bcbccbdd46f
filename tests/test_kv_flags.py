"""`--kv-preset`, `--kv-bits B` picking a preset, and the lever flags, as the CLI parses them."""

from __future__ import annotations

import pytest

from app.cli import build_parser
from app.cli.flags import UserError, cache_config_from
from app.cli.kv_flags import DEFAULT_FOR_BITS, PRESET_NAMES
from mlx_cache import CacheConfig
from mlx_cache import presets


def config(*flags: str) -> CacheConfig:
    return cache_config_from(build_parser().parse_args(["ask", "hi", *flags]))


def test_the_cli_knows_the_presets_without_importing_mlx():
    assert PRESET_NAMES == tuple(presets.PRESETS) and DEFAULT_FOR_BITS == presets.DEFAULT_FOR_BITS


def test_kv_bits_alone_is_the_best_preset_at_those_bits():
    assert config("--kv-bits", "4") == presets.PRESETS["kv4"].config
    assert config("--kv-bits", "3") == presets.PRESETS["kv3"].config
    assert config("--kv-bits", "8") == CacheConfig(k_bits=8, v_bits=8)  # no preset at 8 bits: plain


@pytest.mark.parametrize("flags", [("--kv-group-size", "32"), ("--k-bits", "4"), ("--kv-rotate",), ("--kv-keep-fp", "2")])
def test_kv_bits_with_a_quantization_flag_is_laid_out_by_hand(flags):
    cfg = config("--kv-bits", "4", *flags)
    assert cfg.k_bits == cfg.v_bits == 4 and not cfg.k_per_channel and cfg.fp_window == 0


def test_presets_and_lever_flags():
    assert config("--kv-preset", "kv3") == presets.PRESETS["kv3"].config
    cfg = config("--kv-preset", "kv4", "--cache", "rotating", "--window", "64", "--sinks", "2")
    assert (cfg.kind, cfg.window, cfg.sinks, cfg.keep_fp, cfg.fp_window) == ("rotating", 64, 2, 2, 64)
    cfg = config("--kv-bits", "3", "--kv-fp-window", "32")
    assert cfg == CacheConfig(k_bits=3, v_bits=3, fp_window=32)
    assert config("--kv-bits", "4", "--kv-per-channel-keys").k_per_channel


def test_bad_combinations_are_one_sentence():
    with pytest.raises(UserError, match="quantized cache"):
        config("--kv-fp-window", "16")  # nothing to keep in floats: the cache is not quantized
    with pytest.raises(UserError, match="rotating window"):
        config("--kv-bits", "4", "--kv-fp-window", "100", "--cache", "rotating", "--window", "50")
    with pytest.raises(UserError, match="full cache"):
        config("--kv-bits", "4", "--kv-per-channel-keys", "--cache", "rotating")


def test_a_window_below_its_sinks_is_refused_by_the_flags_only():
    with pytest.raises(UserError, match="window of 2 tokens is smaller than its 4 attention sinks"):
        config("--window", "2")
    with pytest.raises(UserError, match="--sinks at most 3"):
        config("--cache", "rotating", "--window", "3", "--sinks", "5")
    assert config("--window", "2", "--sinks", "2").window == 2  # as many sinks as the window: allowed
    # A layout saved earlier (a session, a settings file) still builds: only choosing one is checked.
    saved = CacheConfig.from_dict({"kind": "rotating", "window": 2, "sinks": 4})
    assert (saved.window, saved.sinks) == (2, 4)
