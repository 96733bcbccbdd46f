"""Prefix lending: a new chat whose prompt starts like a stored session loads those blocks instead of prefilling them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..config import CacheConfig
from ..kinds import FullKVCache
from .errors import StoreError
from .index import BLOCK_TOKENS, canonical_json, chain_keys, kv_dtype_of
from .layers import fill
from .load import read_layers

if TYPE_CHECKING:
    from .session_store import SessionStore


def load_prefix(store: "SessionStore", model_fingerprint: str, cache_config: CacheConfig, tokens: Sequence[int],
                caches: Sequence[Any], kv_dtype: str | None = None) -> int:
    """Load the longest stored block-aligned prefix of `tokens` into empty `caches`.

    For a new chat: any session made with the same model, cache layout and
    float type whose leading blocks hold the same token ids lends them.
    Returns the number of tokens loaded (0 if none), never more than
    ``len(tokens) - 1`` so the engine still has a token to run. Problems
    with other sessions' files are not errors here: the chat just prefills.
    """
    if not caches or not all(isinstance(c, FullKVCache) and c.offset == 0 for c in caches):
        return 0
    usable = (len(tokens) - 1) // BLOCK_TOKENS
    if usable <= 0 or not store.sessions_dir.is_dir():
        return 0
    config_json = canonical_json(cache_config.to_dict())
    wanted = chain_keys(model_fingerprint, config_json, [int(t) for t in tokens[: usable * BLOCK_TOKENS]], BLOCK_TOKENS)
    position = {key: i for i, key in enumerate(wanted)}
    best: tuple[int, str, dict[str, Any]] | None = None
    store_lock = store.store_lock(write=False)
    try:
        for name in store.names():
            try:
                index, _ = store.index(name)
            except StoreError:
                continue
            kv = index["kv"]
            if (
                index["model"]["fingerprint"] != model_fingerprint
                or CacheConfig.from_dict(index["cache_config"]) != cache_config
                or kv["block_tokens"] != BLOCK_TOKENS
                or (kv_dtype is not None and kv_dtype_of(index) != kv_dtype)
                or len(kv["layers"]) != len(caches)
                or any(layer["kind"] != "blocks" or layer["config"] != c.config.to_dict() for layer, c in zip(kv["layers"], caches))
            ):
                continue
            for n, e in enumerate(kv["blocks"]):
                i = position.get(e["key"])
                if i is None or i != n or e["end"] != (i + 1) * BLOCK_TOKENS:
                    break
                if best is None or i + 1 > best[0]:
                    best = (i + 1, name, index)
        if best is None:
            return 0
        n_blocks, name, index = best
        try:
            layers = read_layers(name, store.blocks_dir, index, pad_to=FullKVCache.step, n_blocks=n_blocks)
        except StoreError:
            return 0
    finally:
        store_lock.release()
    for c, layer in zip(caches, layers):
        fill(c, layer)
    return n_blocks * BLOCK_TOKENS
