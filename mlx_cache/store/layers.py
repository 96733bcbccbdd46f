"""What a session stores of each layer's cache, and how stored planes go back into caches.

The store sees three kinds of layer: "blocks" (a full cache: its tokens go to
shared 256-token blocks), "window" (a rotating cache: its bounded ring goes to
one snapshot file) and "state" (any other cache mlx-lm models build, such as
ArraysCache: its ``state`` arrays are stored whole). Caches hand over their
planes and float head through public methods (``temporal_planes``,
``float_head``, ``load_planes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx

from ..config import CacheConfig
from ..kinds import Checkpoint, FullKVCache, RotatingKVCache
from .errors import StoreError
from .hostmem import dtype_name


def kind_of(c: Any) -> str:
    if isinstance(c, RotatingKVCache):
        return "window"
    if isinstance(c, FullKVCache):
        return "blocks"
    return "state"


def n_planes(bits: int | None) -> int:
    return 1 if bits is None else 3  # float data, or (packed, scales, biases)


@dataclass
class Layer:
    """One layer's restored contents, ready to hand to a cache."""

    kind: str  # "blocks", "window" or "state"
    offset: int = 0
    dtype: mx.Dtype | None = None
    keys: tuple[mx.array, ...] = ()  # planes (B, kv_heads, tokens, width), position order
    values: tuple[mx.array, ...] = ()
    fp_head: tuple[mx.array, mx.array] | None = None  # float copies of the leading tokens (keep_fp)
    state: Any = None
    extras: dict[str, tuple[mx.array, mx.array]] | None = None  # the float tail (see FloatParts.extras)


#: Snapshot tensor names of a layer's extras: name -> (key tensor suffix, value tensor suffix).
EXTRA_TENSORS = {"tail": ("kt", "vt")}


def put_extras(arrays: dict[str, mx.array], i: int, extras: dict[str, tuple[mx.array, mx.array]]) -> None:
    for name, (ks, vs) in EXTRA_TENSORS.items():
        if name in extras:
            arrays[f"{i}.{ks}"], arrays[f"{i}.{vs}"] = extras[name]


def pop_extras(arrays: dict[str, mx.array], i: int, spec: dict[str, Any], dtype: mx.Dtype | None
               ) -> dict[str, tuple[mx.array, mx.array]]:
    """The extras a layer's index entry names, popped from the snapshot's tensors."""
    out = {}
    wanted = {"tail": bool(spec.get("fp_tail"))}
    for name, (ks, vs) in EXTRA_TENSORS.items():
        if wanted[name]:
            out[name] = (_cast(arrays.pop(f"{i}.{ks}"), dtype), _cast(arrays.pop(f"{i}.{vs}"), dtype))
    return out


def flatten_state(obj: Any, layer: int, arrays: dict[str, mx.array] | None, path: str = "s") -> Any:
    """A JSON skeleton of a cache's `state` (nested lists of arrays, None and scalars).

    Arrays are named in the skeleton and, when `arrays` is given, put there.
    """
    if isinstance(obj, mx.array):
        name = f"{layer}.{path}"
        if arrays is not None:
            arrays[name] = obj
        return {"tensor": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (list, tuple)):
        return {"items": [flatten_state(x, layer, arrays, f"{path}.{j}") for j, x in enumerate(obj)]}
    raise TypeError(f"a cache state holding {type(obj).__name__} (sessions store arrays and numbers only)")


def unflatten_state(skeleton: Any, arrays: dict[str, mx.array], layer: int) -> Any:
    if "tensor" in skeleton:
        name = skeleton["tensor"]
        if not name.startswith(f"{layer}."):
            raise ValueError(f"state tensor {name} belongs to another layer")
        return arrays.pop(name)
    if "value" in skeleton:
        return skeleton["value"]
    return [unflatten_state(x, arrays, layer) for x in skeleton["items"]]


def describe(name: str, caches: Sequence[Any], n_tokens: int) -> list[dict[str, Any]]:
    """The index's per-layer entries; checks each cache holds what the token list says."""
    out = []
    for i, c in enumerate(caches):
        kind = kind_of(c)
        if kind == "state":
            state = getattr(c, "state", None)
            if state is None:
                raise StoreError(
                    f"Cannot save session {name!r}: layer {i} uses a cache ({type(c).__name__}) "
                    "that sessions cannot store; use this model without a session."
                )
            try:
                skeleton = flatten_state(state, i, None)
            except TypeError as e:
                raise StoreError(f"Cannot save session {name!r}: layer {i} holds {e}.") from None
            out.append({"kind": "state", "class": type(c).__name__, "state": skeleton})
            continue
        offset = int(c.offset)
        if kind == "blocks" and offset != n_tokens:
            raise StoreError(
                f"Cannot save session {name!r}: layer {i} holds {offset} tokens but the chat has {n_tokens}; "
                "this is a bug, please report it."
            )
        head = c.float_head() if offset else None
        extras = c.extras() if offset else {}
        out.append(
            {
                "kind": kind,
                "class": type(c).__name__,
                "config": c.config.to_dict(),
                "offset": offset,
                "dtype": dtype_name(c.dtype) if offset and c.dtype is not None else None,
                "fp_tokens": head[0].shape[2] if head is not None else 0,
                "held": c.tokens if offset else 0,
                "fp_tail": extras["tail"][0].shape[2] if "tail" in extras else 0,
            }
        )
    return out


def put_planes(arrays: dict[str, mx.array], i: int, planes: tuple[tuple[mx.array, ...], tuple[mx.array, ...]],
               fp: tuple[mx.array, mx.array] | None) -> None:
    k, v = planes
    for j, p in enumerate(k):
        arrays[f"{i}.k.{j}"] = p
    for j, p in enumerate(v):
        arrays[f"{i}.v.{j}"] = p
    if fp is not None:
        arrays[f"{i}.kfp"], arrays[f"{i}.vfp"] = fp


def snapshot_arrays(caches: Sequence[Any], layers: list[dict[str, Any]]) -> dict[str, mx.array]:
    """Tensors of the layers stored whole: rotating windows and non-KV model state."""
    arrays: dict[str, mx.array] = {}
    for i, (c, layer) in enumerate(zip(caches, layers)):
        if layer["kind"] == "window" and layer["offset"]:
            put_planes(arrays, i, c.temporal_planes(), c.float_head())
        if layer["kind"] in ("window", "blocks") and layer["offset"]:
            # the float tail changes every turn: saved whole, like a window
            put_extras(arrays, i, c.extras())
        elif layer["kind"] == "state":
            flatten_state(c.state, i, arrays)
    return arrays


def checkpoint_arrays(caches: Sequence[Any], layers: list[dict[str, Any]], checkpoint: Any, n_tokens: int
                      ) -> tuple[int, list[int], dict[str, mx.array]] | None:
    """(position, per-layer offsets, tensors) of a rotating chat's checkpoint, or None if stale or absent."""
    if not checkpoint:
        return None
    position, cps = checkpoint
    if position > n_tokens or len(cps) != len(caches):
        return None  # stale (the chat was trimmed below it): nothing to restore
    arrays: dict[str, mx.array] = {}
    offsets = []
    for i, (c, cp, layer) in enumerate(zip(caches, cps, layers)):
        if not isinstance(cp, Checkpoint) or layer["kind"] == "state":
            return None
        offsets.append(cp.offset)
        if layer["kind"] == "blocks":
            if cp.offset != position or cp.state.get("fp_tail") is not None:
                return None  # the blocks hold the codes, not the float copies of that moment
            continue  # the blocks already hold these tokens
        scratch = RotatingKVCache(c.config)
        scratch.restore(cp)
        planes = scratch.temporal_planes()
        if planes is not None:
            put_planes(arrays, i, planes, scratch.float_head())
            put_extras(arrays, i, scratch.extras())
    return position, offsets, arrays


def check_layer(layer: Layer, spec: dict[str, Any], held: int) -> None:
    if not layer.offset:
        return
    for p in layer.keys + layer.values:
        if p.ndim != 4 or p.shape[2] < held:
            raise ValueError(f"a plane of shape {p.shape} for {held} tokens")
    if layer.fp_head is not None and layer.fp_head[0].shape[2] != min(spec["fp_tokens"], layer.offset):
        raise ValueError("float head of the wrong length")


def fill(c: Any, layer: Layer) -> None:
    """Hand a restored layer to its cache."""
    if layer.kind == "state":
        c.state = layer.state
    elif not layer.offset:
        c.reset()
    else:
        c.load_planes(layer.keys, layer.values, layer.offset, layer.dtype, float_head=layer.fp_head, extras=layer.extras)


def window_layer(i: int, spec: dict[str, Any], arrays: dict[str, mx.array], dtype: mx.Dtype | None) -> Layer:
    """A rotating layer from a snapshot's tensors (popped, so host copies go once MLX has them)."""
    cfg = CacheConfig.from_dict(spec["config"])
    layer = Layer("window", offset=spec["offset"], dtype=dtype)
    if layer.offset:
        layer.keys = tuple(_cast(arrays.pop(f"{i}.k.{j}"), dtype) for j in range(n_planes(cfg.k_bits)))
        layer.values = tuple(_cast(arrays.pop(f"{i}.v.{j}"), dtype) for j in range(n_planes(cfg.v_bits)))
        if spec["fp_tokens"]:
            layer.fp_head = (_cast(arrays.pop(f"{i}.kfp"), dtype), _cast(arrays.pop(f"{i}.vfp"), dtype))
        layer.extras = pop_extras(arrays, i, spec, dtype)
    return layer


def _cast(a: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """Float planes in the float type asked for; packed codes (uint32) as they are."""
    if dtype is None or a.dtype == mx.uint32 or a.dtype == dtype:
        return a
    return a.astype(dtype)


def build_checkpoint(caches: Sequence[Any], layers: list[Layer], arrays: dict[str, mx.array], entry: dict[str, Any],
                     stored: list[dict[str, Any]]) -> tuple[int, list[Checkpoint]] | None:
    position = entry["position"]
    out = []
    for i, (c, layer, offset) in enumerate(zip(caches, layers, entry["offsets"])):
        scratch = type(c)(c.config)
        if layer.kind == "blocks":
            if offset:
                scratch.load_planes(layer.keys, layer.values, offset, layer.dtype, float_head=layer.fp_head)
        elif layer.kind == "window":
            if f"{i}.k.0" in arrays:
                spec = dict(stored[i], offset=offset, fp_tokens=1 if f"{i}.kfp" in arrays else 0,
                            fp_tail=f"{i}.kt" in arrays)
                w = window_layer(i, spec, arrays, layer.dtype)
                scratch.load_planes(w.keys, w.values, offset, layer.dtype, float_head=w.fp_head, extras=w.extras)
        else:
            return None
        out.append(scratch.checkpoint())
    return position, out
