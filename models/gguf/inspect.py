"""What a GGUF file is, read from its header alone: for listings, before anything is converted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .archs import ARCHITECTURES
from .common import GGUFError
from .container import file_type_name, open_gguf, type_name
from .quants import can_read, is_exact


@dataclass(frozen=True)
class GGUFSummary:
    """A file's name, architecture, quantization and whether kvchat runs it (and if not, why)."""

    name: str | None
    architecture: str | None
    quant: str | None  # llama.cpp's file type ("Q4_K_M"), else the most common tensor type
    parameters: int
    runnable: bool
    reason: str | None  # why not, in one sentence; or what is rounded
    exact: bool  # every tensor maps onto MLX without changing a value (Q6_K and others are re-quantized)


def summarize(path: Path) -> GGUFSummary:
    """Read a GGUF header (not its vocabulary, not its weights) and say what it is."""
    try:
        gg = open_gguf(path, with_data=False, vocabulary=False)
    except GGUFError as e:
        return GGUFSummary(None, None, None, 0, False, str(e), False)
    md = gg.metadata
    arch_name = gg.architecture
    arch = ARCHITECTURES.get(arch_name or "")
    kept = []
    for info in gg.tensors.values():
        if arch is not None:
            try:
                if arch.hf_name(info.name) is None:
                    continue
            except GGUFError:
                pass
        kept.append(info)
    types = Counter(type_name(i.type_id) for i in kept if len(i.shape) > 1)
    quant = file_type_name(md.get("general.file_type")) or (types.most_common(1)[0][0] if types else None)
    params = sum(i.n_elements for i in kept)
    name = md.get("general.name") if isinstance(md.get("general.name"), str) else None
    reason = _refusal(gg, arch_name, kept)
    exact = reason is None and all(is_exact(i.type_id) for i in kept)
    return GGUFSummary(name, arch_name, quant, params, reason is None, reason, exact)


def _refusal(gg, arch_name, kept) -> str | None:
    split = gg.metadata.get("split.count")
    if isinstance(split, int) and split > 1:
        return f"one of {split} parts of a split GGUF (merge them with llama-gguf-split --merge)"
    if arch_name not in ARCHITECTURES:
        return f"{arch_name or 'unknown'} architecture (kvchat converts {', '.join(ARCHITECTURES)})"
    arch = ARCHITECTURES[arch_name]
    for info in gg.tensors.values():
        try:
            arch.hf_name(info.name)
        except GGUFError:
            return f"tensor {info.name} is not part of a plain {arch_name} text model"
    bad = sorted({type_name(i.type_id) for i in kept if not can_read(i.type_id)})
    if bad:
        return f"tensor types {', '.join(bad)} are not supported"
    if any(".ffn_gate_inp." in n or "_exps." in n for n in gg.tensors):
        return "mixture-of-experts models are not supported"
    if gg.metadata.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
        return f"{gg.metadata.get('tokenizer.ggml.model') or 'missing'} tokenizer"
    return None
