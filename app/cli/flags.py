"""What the `kvchat` commands share: the parser, the flags, and turning flags into configs.

Every flag is checked when it is parsed: a value that is not finite or out of
range is one sentence naming the flag, the range and the value (exit code 2).
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable, NoReturn

from mlx_cache.numbers import MAX_TOKEN_COUNT, parse_number

from .kv_flags import KV_QUALITY_FLAGS, add_kv_quality_args, apply_kv_quality_flags

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: printed as one sentence, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one sentence and a pointer to --help."""

    def error(self, message: str) -> NoReturn:  # argparse's default prints the whole usage
        ours = re.match(r"argument [^:]+: (--[\w-]+ .*)\Z", message, re.S)
        if ours:  # a sentence of our own from a flag's type function: it names the flag already
            self.exit(EXIT_USAGE, f"kvchat: {ours.group(1)}\n")
        chat = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
        if chat and _is_saved_chat(chat.group(1)):  # `kvchat trip` for the chat named trip
            name = chat.group(1)
            self.exit(EXIT_USAGE, f"kvchat: {name!r} is a saved chat, not a command: run 'kvchat --session {name}' "
                                  "to open it.\n")
        message = message[0].upper() + message[1:]
        self.exit(EXIT_USAGE, f"kvchat: {message}. Run '{self.prog} --help' for the options.\n")


def _is_saved_chat(name: str) -> bool:
    from mlx_cache.store import SessionStore, StoreError

    try:
        return SessionStore().exists(name)
    except (StoreError, OSError):  # a name the store refuses, an unreadable folder: then it is just a wrong command
        return False


def number(flag: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: the flag's value, finite and in [lo, hi], or one sentence naming both."""

    def parse(text: str) -> Any:
        return parse_number(text, flag, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open,
                            error=argparse.ArgumentTypeError)

    return parse


def size(flag: str) -> Callable[[str], str]:
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


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", choices=["full", "rotating"], help="cache kind (default: full)")
    g.add_argument("--window", type=number("--window", 1, MAX_TOKEN_COUNT, integer=True),
                   help="rotating: recent tokens kept (default 4096)")
    g.add_argument("--sinks", type=number("--sinks", 0, MAX_TOKEN_COUNT, integer=True),
                   help="rotating: leading tokens never evicted (default 4)")
    g.add_argument("--kv-bits", type=number("--kv-bits", 2, 8, integer=True),
                   help="quantize keys and values to B bits (2,3,4,6,8)")
    g.add_argument("--k-bits", type=number("--k-bits", 2, 8, integer=True), help="bits for keys only")
    g.add_argument("--v-bits", type=number("--v-bits", 2, 8, integer=True), help="bits for values only")
    g.add_argument("--kv-group-size", type=number("--kv-group-size", 32, 128, integer=True),
                   help="quantization group size (32, 64, 128)")
    g.add_argument("--kv-keep-fp", type=number("--kv-keep-fp", 0, MAX_TOKEN_COUNT, integer=True),
                   help="leading tokens kept unquantized")
    g.add_argument("--kv-rotate", action="store_true", default=None, help="Hadamard-rotate K/V before quantizing")
    add_kv_quality_args(g, number, MAX_TOKEN_COUNT)
    g.add_argument("--kv-budget", type=size("--kv-budget"),
                   help="KV memory budget such as 2GB (default: what the device can spare)")
    g.add_argument("--on-budget", choices=["rotate", "refuse"], default=None,
                   help="when a chat would exceed the budget: switch to a rotating window, or refuse")


CACHE_FLAGS = ("cache", "window", "sinks", "kv_bits", "k_bits", "v_bits", "kv_group_size", "kv_keep_fp", "kv_rotate",
               *KV_QUALITY_FLAGS)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=number("--max-tokens", 1, MAX_TOKEN_COUNT, integer=True),
                   help="most tokens in the answer (default 512)")
    g.add_argument("--temp", type=number("--temp", 0, 100), help="temperature; 0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=number("--top-p", 0, 1, lo_open=True), help="nucleus sampling mass (default 0.95)")
    g.add_argument("--min-p", type=number("--min-p", 0, 1, hi_open=True), help="min-p filter (default 0.05)")
    g.add_argument("--repetition-penalty", type=number("--repetition-penalty", 0.01, 100),
                   help="penalty for recent tokens; 1 is off (default 1.1)")
    g.add_argument("--seed", type=number("--seed", 0, 2**64 - 1, integer=True), help="seed for repeatable sampling")
    g.add_argument("--stop", action="append", default=None, help="extra stop string (repeatable)")


SAMPLING_FLAGS = ("max_tokens", "temp", "top_p", "min_p", "repetition_penalty", "seed", "stop")


def given(args: argparse.Namespace, names: tuple[str, ...]) -> bool:
    """Whether any of these flags was given."""
    return any(getattr(args, f, None) is not None for f in names)


def merged(args: argparse.Namespace, name: str) -> Any:
    """A flag given after the subcommand wins over the same flag before it."""
    sub = getattr(args, f"sub_{name}", None)
    return sub if sub is not None else getattr(args, name, None)


def cache_config_from(args: argparse.Namespace, base: Any = None) -> Any:
    """CacheConfig from flags (over `base`, e.g. saved settings)."""
    from mlx_cache import CacheConfig, CacheConfigError

    from ..settings import window_below_sinks

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
        config = CacheConfig.from_dict(apply_kv_quality_flags(args, fields))
    except CacheConfigError as e:
        raise UserError(str(e)) from None
    problem = window_below_sinks(config)
    if problem and any(getattr(args, f, None) is not None for f in ("cache", "window", "sinks")):
        raise UserError(f"{problem}: give --window at least {config.sinks}, or --sinks at most {config.window}.")
    return config


def sampling_from(args: argparse.Namespace, base: Any = None) -> Any:
    """SamplingConfig from flags (over `base`, e.g. a session's own)."""
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
    """The --kv-budget in bytes, or None when not given."""
    text = getattr(args, "kv_budget", None)
    if not text:
        return None
    from mlx_cache.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(str(e)) from None
