"""Convert a GGUF file into an MLX model directory that mlx-lm loads.

The tensors are read from the file's memory map and repacked in numpy
(`quants`), renamed to the Hugging Face layout of the architecture (`archs`),
and written with a `config.json` whose per-module `quantization` map records
each module's bits and group size, so `mlx_lm.utils.load` and
`mlx_lm generate --model DIR` take the folder as it is. The tokenizer is rebuilt
from the file's vocabulary (`tokenizer`).

Everything is written into a temporary directory next to the target and renamed
into place, so a half-written model is never visible; the source file is only
ever read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .archs import Arch, architecture_of
from .common import GGUFError, Progress, write_json as _write_json
from .container import GGUFFile, TensorInfo, open_gguf, type_name
from .quants import FLOAT_TYPES, Quantized, can_read, is_exact, repack, requantize, to_float
from .marker import CONVERTER_VERSION, MARKER_FILE, is_converted  # noqa: F401  (is_converted: importable from here)
from .tokenizer import check_tokenizer, write_tokenizer


def default_dtype() -> mx.Dtype:
    """The float type for scales, biases and norms: it sets the activation dtype.

    On a GPU (Metal, CUDA) half precision is the fast path. On the CPU backend
    half-precision quantized matmuls are dramatically slower: SmolLM2-135M Q4_1
    (mlx 0.32.4, 2-core x86, 38-token prompt) prefilled 0.3 tok/s and decoded
    0.2 tok/s with float16 scales, against 10 and 7 tok/s with float32 scales,
    so the CPU gets float32 (the weights file grows 98 -> 115 MB).
    """
    return mx.float16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    dtype: mx.Dtype | None = None,
) -> Path:
    """Convert a GGUF file into an MLX model directory at `out_dir` and return it.

    The directory holds `config.json`, `model.safetensors`, `tokenizer.json`,
    `tokenizer_config.json`, `special_tokens_map.json` and a marker file written last.
    `dtype` is the float type for scales, biases and unquantized tensors (default:
    `default_dtype()`). An existing `out_dir` is replaced.

    Raises GGUFError for an unsupported architecture, tensor type or tokenizer.
    """
    say = progress or (lambda _m: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = dtype or default_dtype()
    started = time.perf_counter()
    with open_gguf(gguf_path) as gg:
        arch = architecture_of(gg)
        plan = _plan(gg, arch)
        check_tokenizer(gg.metadata)
        config = arch.config(gg, arch)
        # Q6_K is re-quantized too, but by design (see quants): only the rest earns a warning
        requantized = sorted({i.type_name for i, _ in plan if not is_exact(i.type_id) and i.type_name != "Q6_K"})
        if requantized:
            say(f"{gguf_path.name} holds {', '.join(requantized)} tensors, which MLX cannot run as they are: "
                "kvchat decodes them and re-quantizes them to 8 bits (more memory than the file, values rounded "
                "to within 1/255 of each 64-value group's range).")
        summary = dict(Counter(type_name(i.type_id) for i, _ in plan))

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        workers = max(1, min(4, os.cpu_count() or 1))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the model directory need not be
            with ThreadPoolExecutor(workers + 1) as pool:
                # the tokenizer is mostly Python (GIL-bound), the weights mostly numpy: build both at once
                tokenizer = pool.submit(write_tokenizer, tmp, gg.metadata, dict(config), say)
                weights, quant = _convert_weights(gg, arch, plan, config, dtype, say, pool, workers)
                if quant:
                    config["quantization"] = quant
                say("Writing the MLX weights...")
                mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
                del weights
                tokenizer.result()
            _write_json(tmp / "config.json", config)
            _write_json(tmp / MARKER_FILE, {
                "converter_version": CONVERTER_VERSION,
                "source": gguf_path.name,
                "source_bytes": gguf_path.stat().st_size,
                "architecture": arch.name,
                "tensor_types": summary,
                "requantized": requantized + (["Q6_K"] if "Q6_K" in summary else []),
                "dtype": str(dtype).removeprefix("mlx.core."),
                "mlx": mx.__version__,
            })
            _move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"Converted {gguf_path.name} in {time.perf_counter() - started:.1f} s.")
    return out_dir


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's rotary row permutation of a q/k projection (numpy or MLX, any per-row tensor).

    llama.cpp stores each head's rows as `w.reshape(n_head, 2, d // 2, ...)
    .swapaxes(1, 2)`, interleaving the two rotary halves; Hugging Face llama keeps
    them as two contiguous halves. Packed weights, scales, biases and biases of
    the projection all have one entry per output row, so the same inverse applies.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"A q/k projection has {rows} rows, which does not split into {n_head} heads of even size.")
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- weights


def _plan(gg: GGUFFile, arch: Arch) -> list[tuple[TensorInfo, str]]:
    """(tensor, Hugging Face name) for every tensor the model needs; refuses unreadable types first."""
    plan = []
    for info in gg.tensors.values():
        hf = arch.hf_name(info.name)
        if hf is None:
            continue
        if not can_read(info.type_id):
            raise GGUFError(
                f"{gg.path.name} holds tensor {info.name} in {info.type_name}, which kvchat cannot convert: "
                "see the README's table of supported tensor types."
            )
        plan.append((info, hf))
    names = {hf for _, hf in plan}
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in names:
            raise GGUFError(f"The GGUF file lacks the tensor for {required}, so it is not a complete model.")
    return plan


def _convert_weights(
    gg: GGUFFile, arch: Arch, plan: list[tuple[TensorInfo, str]], config: dict[str, Any], dtype: mx.Dtype,
    say: Progress, pool: ThreadPoolExecutor, workers: int,
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    total = sum(i.n_elements for i, _ in plan)
    done, shown = 0, 0
    out: dict[str, mx.array] = {}
    per_module: dict[str, tuple[int, int]] = {}
    say(f"Converting {total / 1e6:,.0f}M weights...")
    # numpy releases the GIL, so tensors repack in parallel; a few ahead at most, to bound memory
    pending: deque[Future] = deque()
    queue = iter(plan)
    for item in islice(queue, 2 * workers):
        pending.append(pool.submit(_numpy_stage, gg, arch, *item))
    while pending:
        info, hf, stage = pending.popleft().result()
        nxt = next(queue, None)
        if nxt is not None:
            pending.append(pool.submit(_numpy_stage, gg, arch, *nxt))
        module, _, param = hf.rpartition(".")
        if isinstance(stage, np.ndarray) and len(info.shape) == 2 and info.type_id not in FLOAT_TYPES:
            stage = requantize(stage)  # MLX's quantizer, on this thread: MLX ops need its stream
        if isinstance(stage, Quantized):
            parts = {"weight": stage.weight, "scales": stage.scales, "biases": stage.biases}
            per_module[module] = (stage.group_size, stage.bits)
        else:
            parts = {param: stage}
        n_head = heads.get(module.rsplit(".", 1)[-1]) if arch.permute_qk else None
        for key, value in parts.items():
            if n_head is not None:
                value = unpermute_rows(value, n_head)
            array = mx.array(value)
            if mx.issubdtype(array.dtype, mx.floating):
                # the scales' dtype is the dtype the whole forward pass runs in
                array = array.astype(dtype)
            out[f"{module}.{key}"] = array
        mx.eval([out[f"{module}.{key}"] for key in parts])
        done += info.n_elements
        if done * 10 // total > shown:
            shown = done * 10 // total
            say(f"Converting: {shown * 10}% ({done / 1e6:,.0f}M of {total / 1e6:,.0f}M weights)")
    return out, _quantization_map(per_module)


def _numpy_stage(gg: GGUFFile, arch: Arch, info: TensorInfo, hf: str) -> tuple[TensorInfo, str, Quantized | np.ndarray]:
    """A tensor repacked (exact types), or decoded to float32 (norms, float and re-quantized types)."""
    raw = gg.raw(info)
    if len(info.shape) == 2 and info.type_id not in FLOAT_TYPES and is_exact(info.type_id):
        return info, hf, repack(raw, info.type_id, info.shape)
    value = to_float(raw, info.type_id, info.shape)
    if arch.norm_offset and hf.endswith("norm.weight"):
        value = value - np.float32(arch.norm_offset)
    return info, hf, value


def _quantization_map(per_module: dict[str, tuple[int, int]]) -> dict[str, Any] | None:
    """mlx-lm's `quantization` config: the most common (group, bits) plus per-module overrides."""
    if not per_module:
        return None
    group, bits = Counter(per_module.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for module, (g, b) in sorted(per_module.items()):
        if (g, b) != (group, bits):
            quant[module] = {"group_size": g, "bits": b}
    return quant


# --------------------------------------------------------------------------- files


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, replacing an old or partial one."""
    from mlx_cache.store.durable import sync_dir, sync_path

    for f in tmp.iterdir():
        sync_path(f)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # A non-empty directory cannot be replaced in one rename: move it aside first.
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    sync_dir(out_dir.parent)


