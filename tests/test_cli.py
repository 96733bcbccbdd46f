"""The kvchat command line, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kvchat(*args: str, home=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["KVCHAT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_version_and_help():
    r = kvchat("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvchat ")
    r = kvchat("--help")
    assert r.returncode == 0 and "ask" in r.stdout and "sessions" in r.stdout


def test_ask_json_on_tiny_model(tiny_model_dirs, tmp_path):
    r = kvchat("ask", "hello", "-m", str(tiny_model_dirs["llama"]), "--max-tokens", "5", "--temp", "0",
               "--kv-bits", "4", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] in ("length", "stop")
    for key in ("prompt_tokens", "reused_tokens", "prefilled_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s", "generated_tokens"):
        assert key in out["stats"]
    cache = out["stats"]["cache"]
    # --kv-bits 4 alone is the kv4 preset: 4-bit keys, 3-bit values (see app/cli/kv_flags.py)
    assert cache["kind"] == "full" and cache["bits"] == [4, 3] and cache["tokens"] > 0
    assert 0 < cache["bytes_used"] <= cache["bytes_allocated"]
    assert "Traceback" not in r.stderr


def test_ask_session_resumes_without_reprefill(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    a = kvchat("ask", "first question", "-m", model, "--max-tokens", "4", "--temp", "0", "--session", "s1", "--json", home=tmp_path)
    assert a.returncode == 0, a.stderr
    b = kvchat("ask", "second", "-m", model, "--max-tokens", "4", "--temp", "0", "--session", "s1", "--json", home=tmp_path)
    assert b.returncode == 0, b.stderr
    first, second = json.loads(a.stdout)["stats"], json.loads(b.stdout)["stats"]
    assert second["reused_tokens"] >= first["prompt_tokens"]
    assert second["prefilled_tokens"] == second["prompt_tokens"] - second["reused_tokens"]
    listing = json.loads(kvchat("sessions", "list", "--json", home=tmp_path).stdout)
    assert [s["name"] for s in listing] == ["s1"] and listing[0]["tokens"] > 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (("ask", "hi", "-m", "/no/such/model"), "No model at"),
        (("ask", "  ", "-m", "/no/such/model"), "empty"),
        (("ask", "hi", "--frobnicate"), "nrecognized"),
        (("ask", "hi", "--kv-bits", "5"), "not supported"),
        (("ask", "hi", "--kv-budget", "lots"), "--kv-budget must be a size"),
        (("ask", "hi", "-m", "nope.gguf"), "No GGUF file"),
        (("sessions", "show", "../etc"), ""),
        (("ask", "hi", "--session", "../x"), "session name"),
        (("ask", "hi", "--sinks", "-3"), "--sinks must be a whole number from 0"),
        (("ask", "hi", "--window", "0"), "--window must be a whole number from 1"),
        (("--window", "2"), "A rotating window of 2 tokens is smaller than its 4 attention sinks: give --window at least 4"),
        (("ask", "hi", "--sinks", "9", "--window", "8"), "smaller than its 9 attention sinks"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, needle, tmp_path):
    r = kvchat(*args, home=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_prompt_longer_than_context(tiny_model_dirs, tmp_path):
    r = kvchat("ask", "x " * 5000, "-m", str(tiny_model_dirs["llama"]), home=tmp_path)
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr


def test_info_json(tiny_model_dirs, tmp_path):
    from mlx_cache import CacheConfig
    from mlx_cache.memory import KVShape, max_context, max_window_in_budget

    r = kvchat("info", "-m", str(tiny_model_dirs["qwen2"]), "--json", "--kv-budget", "4MiB", home=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen2" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["head_dim"] == 64 and info["kv_bytes_per_token"] == 2 * 2 * 2 * 64 * 4
    shape = KVShape(2, 2, 64, 4, n_heads=4, hidden_size=256, intermediate_size=256)
    fits = info["max_context_in_budget"]
    # The cache and a turn's prefill scratch share the budget: less than the
    # 4 MiB / 2,048 bytes per token = 2,048 tokens the cache alone would take.
    assert fits["full"] == max_context(shape, CacheConfig(), 4 << 20) and 0 < fits["full"] < 2048
    assert fits["q4"] > fits["q8"] > fits["full"]
    # A window never runs out of context; the budget bounds the window, its
    # checkpoint copy and the scratch: below (4 MiB / 2) / 2,048 - 4 sinks = 1,020.
    assert fits["rotating"] == "unbounded"
    window = info["max_window_in_budget"]["rotating"]
    assert window == max_window_in_budget(shape, CacheConfig(kind="rotating"), 4 << 20) and 0 < window < 1020
    assert info["max_window_in_budget"]["rotating-q4"] > window
    from mlx_cache.presets import PRESETS

    presets = {p["name"]: p for p in info["kv_presets"]}
    assert list(presets) == list(PRESETS)
    for name, p in PRESETS.items():
        assert presets[name]["max_context_in_budget"] == max_context(shape, p.config, 4 << 20) > 0
        assert presets[name]["measured"]["bits"] == p.bits


def test_bench_quality_runs_from_the_command_line(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    r = kvchat("bench", "quality", "-m", model, "--contexts", "100", home=tmp_path)
    assert r.returncode == 2 and "--contexts" in r.stderr and "Traceback" not in r.stderr
    # Beyond the tiny model's context (4,096): one sentence, exit code 2.
    r = kvchat("bench", "quality", "-m", model, "--contexts", "8192", "--layouts", "q4", home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "context" in r.stderr.splitlines()[-1]
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    r = kvchat("bench", "quality", "-m", model, "--contexts", "128", "--tokens", "512", "--layouts", "q4",
               "--text", str(text), "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text_tokens"] == 540 and [row["name"] for row in out["results"]] == ["full", "q4"]
    assert all(row["segments"] == 4 for row in out["results"])


def test_session_commands_export_fork_and_keep_settings(tiny_model_dirs, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache

    model = str(tiny_model_dirs["llama"])
    a = kvchat("ask", "first question", "-m", model, "--max-tokens", "4", "--temp", "0", "--session", "s",
               home=tmp_path)
    assert a.returncode == 0, a.stderr
    # A later turn without sampling flags keeps the session's own (greedy) sampling.
    b = kvchat("ask", "second", "-m", model, "--max-tokens", "4", "--session", "s", home=tmp_path)
    assert b.returncode == 0, b.stderr
    shown = json.loads(kvchat("sessions", "show", "s", "--json", home=tmp_path).stdout)
    assert shown["sampling"]["temperature"] == 0.0
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant", "user", "assistant"]

    assert kvchat("sessions", "fork", "s", "t", home=tmp_path).returncode == 0
    # The spelling: the output file after the format.
    r = kvchat("sessions", "export", "t", "--format", "mlx-lm", str(tmp_path / "t-cache"), home=tmp_path)
    assert r.returncode == 0, r.stderr
    cache, meta = load_prompt_cache(str(tmp_path / "t-cache.safetensors"), return_metadata=True)
    assert cache[0].offset == len(json.loads(meta["tokens"])) > 0

    md = kvchat("sessions", "export", "t", home=tmp_path)
    assert md.returncode == 0 and "first question" in md.stdout
    bad = kvchat("sessions", "export", "t", "-o", str(tmp_path / "no" / "such" / "dir.md"), home=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "folder" in bad.stderr

    # A damaged session is named on stderr, not silently hidden.
    (tmp_path / "sessions" / "t.json").write_text("{ not json")
    listing = kvchat("sessions", "list", "--json", home=tmp_path)
    assert [x["name"] for x in json.loads(listing.stdout)] == ["s"]
    assert "t" in listing.stderr and "skipped" in listing.stderr


def test_repo_id_without_network_or_cache_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    r = kvchat("ask", "hi", "-m", "acme/no-such-model", home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "acme/no-such-model" in last and "no cached copy" in last


def test_a_folder_without_weights_and_a_file_that_is_not_gguf(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    for spec, needle in ((folder, "safetensors"), (bad, "GGUF magic")):
        r = kvchat("ask", "hi", "-m", str(spec), home=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert needle in last and ":" in last.split(needle, 1)[1]  # the problem, then the way out


def test_ask_refuses_a_session_open_elsewhere_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    from mlx_cache.store import SessionStore

    lock = SessionStore().lock("busy")  # as a kvchat window holding it would
    try:
        r = kvchat("ask", "hello", "--session", "busy", "-m", str(tmp_path / "no-model-needed"), home=tmp_path)
    finally:
        lock.release()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "busy" in r.stderr and "Loading" not in r.stderr  # refused first: no model read (nor even looked for)


def test_a_saved_chats_name_given_as_a_command_points_to_session(tiny_model_dirs, tmp_path):
    r = kvchat("ask", "hi", "-m", str(tiny_model_dirs["llama"]), "--max-tokens", "2", "--session", "trip", home=tmp_path)
    assert r.returncode == 0, r.stderr
    r = kvchat("trip", home=tmp_path)
    assert r.returncode == 2 and r.stderr == ("kvchat: 'trip' is a saved chat, not a command: run 'kvchat --session trip' "
                                              "to open it.\n")
    r = kvchat("tripp", home=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'tripp'" in r.stderr and "Traceback" not in r.stderr
