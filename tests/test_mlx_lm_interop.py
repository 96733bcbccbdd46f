"""mlx-lm's own command line continues a chat kvchat exported (`sessions export --format mlx-lm`).

The check is end to end and real: a tiny random-weight llama saved as an MLX
model folder, a kvchat session on it (one greedy turn), the export made by the
kvchat CLI, and `python -m mlx_lm generate --prompt-cache-file` run as a
subprocess. Its greedy answer to a follow-up must equal kvchat's own answer
when the same session continues.

Both sides must read the same tokens. mlx-lm's generate, by default, applies
the chat template to --prompt and keeps only the part after where the user's
text goes, assuming the cache ends just before it; kvchat's cache ends inside
the last answer (the answer's last token is never run through the model), so
the follow-up kvchat reads is that token, the end of the answer and the whole
templated user turn. mlx-lm is therefore given exactly that text with
``--ignore-chat-template`` (which encodes it as it is), on stdin (``--prompt -``
leaves it alone; a --prompt argument has its backslash-n sequences replaced).

The model: tiny.py's llama with untied output weights, attention weights
scaled up so the answer depends on the context (tied embeddings and small
attention mostly echo the last token), and output rows only for printable
ASCII tokens, so every answer is valid text that re-encodes to the ids the
model wrote (a byte-level model writing half a UTF-8 character would make
kvchat re-prefill from there, which mlx-lm's append-only cache cannot do).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from models.chat import Chat
from models.engine import Engine, Finished
from models.sample import GREEDY
from models.template import decode_ids

from tiny import PRESETS, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You answer in short sentences and never use more words than needed. " * 5  # ~350 tokens: two blocks
FIRST = "Hello there, what is MLX?"
FOLLOW = "And what is a KV cache?"
MAX_TOKENS = 8


def build_model(out: Path, seed: int = 0, attention_scale: float = 4.0) -> Path:
    """A random-weight llama folder (config.json, model.safetensors, tokenizer) that mlx-lm's CLI loads."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    config = dict(PRESETS["llama"], vocab_size=vocab, tie_word_embeddings=False)
    module = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    printable = [float(len(t) == 1 and 32 <= ord(t) < 127) for t in (tok.decode([i]) for i in range(vocab))]
    weights["lm_head.weight"] = weights["lm_head.weight"] * mx.array(printable)[:, None]
    for key in weights:
        if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            weights[key] = weights[key] * attention_scale
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("interop") / "llama-ctx")


@pytest.fixture(scope="module")
def engine(model_dir):
    from models.load import load_model

    return Engine(load_model(str(model_dir)))


def kvchat(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVCHAT_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def mlx_lm_generate(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_lm", "generate", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=180)


def turn(chat: Chat, text: str) -> Finished:
    return [e for e in chat.send(text) if isinstance(e, Finished)][-1]


def test_mlx_lm_generate_continues_a_kvchat_export(engine, model_dir, tmp_path):
    from mlx_lm.generate import generate
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

    from mlx_cache.store import SessionStore

    home = tmp_path / "home"
    store = SessionStore(home)
    chat = Chat.open(engine, store, "trip", sampling=GREEDY.with_(max_tokens=MAX_TOKENS))
    chat.set_system(SYSTEM)
    first = turn(chat, FIRST)
    assert first.reason == "length" and first.text.isascii() and first.text.isprintable()
    chat.close()

    # The real kvchat CLI writes the file, naming the model folder mlx-lm is to load.
    out = tmp_path / "exports" / "trip-cache.safetensors"
    out.parent.mkdir()
    r = kvchat("sessions", "export", "trip", "--format", "mlx-lm", str(out), "--model", str(model_dir), home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"Wrote {out}" and "note" not in r.stderr and "Traceback" not in r.stderr
    cache, meta = load_prompt_cache(str(out), return_metadata=True)
    assert meta["model"] == str(model_dir)
    assert isinstance(json.loads(meta["tokenizer_config"]), dict)

    # What kvchat reads for the follow-up: its cache holds `cached`, the rest is the suffix.
    chat = Chat.open(engine, store, "trip")
    cached = list(chat.state.tokens)
    assert cache[0].offset == len(cached) == len(json.loads(meta["tokens"])) > 256
    target = engine.prompt(chat.state, chat.messages + [{"role": "user", "content": FOLLOW}])
    assert target[: len(cached)] == cached  # kvchat keeps its whole cache and runs only the suffix
    suffix = target[len(cached) :]
    suffix_text = decode_ids(engine.tokenizer, suffix)
    assert FOLLOW in suffix_text and suffix_text.endswith("<|im_start|>assistant\n")
    # mlx-lm encodes an --ignore-chat-template prompt with add_special_tokens=True: the same ids
    assert engine.tokenizer.encode(suffix_text, add_special_tokens=True) == suffix

    mlx = mlx_lm_generate("--model", str(model_dir), "--prompt-cache-file", str(out), "--ignore-chat-template",
                          "--prompt", "-", "--max-tokens", str(MAX_TOKENS), "--temp", "0", "--verbose", "False",
                          stdin=suffix_text)
    assert mlx.returncode == 0, mlx.stderr
    assert "Traceback" not in mlx.stderr

    follow = turn(chat, FOLLOW)
    chat.close()
    assert follow.stats.reused_tokens == len(cached) and follow.stats.prefilled_tokens == len(suffix)
    assert follow.reason == "length" and len(follow.text) == MAX_TOKENS
    assert mlx.stdout == follow.text + "\n"

    # The answer depends on what the cache holds: without it the same suffix reads otherwise.
    alone = generate(engine.model, engine.tokenizer, suffix, max_tokens=MAX_TOKENS, prompt_cache=make_prompt_cache(engine.model))
    assert alone != follow.text


def test_export_without_a_findable_model_says_how_to_name_it(engine, model_dir, tmp_path):
    """The session's model name for a folder is its basename: the export says to pass --model."""
    from mlx_lm.models.cache import load_prompt_cache

    from mlx_cache.store import SessionStore

    home = tmp_path / "home"
    chat = Chat.open(engine, SessionStore(home), "trip", sampling=GREEDY.with_(max_tokens=2))
    turn(chat, FIRST)
    chat.close()
    out = tmp_path / "trip.safetensors"
    r = kvchat("sessions", "export", "trip", "--format", "mlx-lm", str(out), home=home)
    assert r.returncode == 0, r.stderr
    assert load_prompt_cache(str(out), return_metadata=True)[1]["model"] == model_dir.name
    assert "--model" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    # Another model folder is refused: its KV would be garbage to mlx-lm.
    other = build_model(tmp_path / "other", seed=1)
    r = kvchat("sessions", "export", "trip", "--format", "mlx-lm", str(tmp_path / "o.safetensors"), "--model", str(other),
               home=home)
    assert r.returncode == 2 and "not the model session 'trip' was made with" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()
    r = kvchat("sessions", "export", "trip", "-o", str(tmp_path / "t.md"), "--model", str(model_dir), home=home)
    assert r.returncode == 2 and "--format mlx-lm" in r.stderr and not (tmp_path / "t.md").exists()
