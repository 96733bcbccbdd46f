"""End-to-end checks with the embedded SmolLM2-135M-Instruct (a few, short: the CPU is slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France? Answer in one sentence."


def kvchat(*args: str, home) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVCHAT_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, timeout=300)


def test_ask_names_paris(tmp_path):
    r = kvchat("ask", QUESTION, "--temp", "0", "--max-tokens", "12", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"]
    assert out["stats"]["prefilled_tokens"] == out["stats"]["prompt_tokens"]


def test_session_resumes_without_reprefill(tmp_path):
    a = kvchat("ask", QUESTION, "--temp", "0", "--max-tokens", "8", "--session", "geo", "--kv-bits", "8", "--json", home=tmp_path)
    assert a.returncode == 0, a.stderr
    b = kvchat("ask", "And Italy?", "--temp", "0", "--max-tokens", "8", "--session", "geo", "--json", home=tmp_path)
    assert b.returncode == 0, b.stderr
    first, second = json.loads(a.stdout), json.loads(b.stdout)
    s = second["stats"]
    # everything up to the end of the first answer comes from disk, not the model
    assert s["reused_tokens"] >= first["stats"]["prompt_tokens"] + first["stats"]["generated_tokens"] - 1
    assert s["prefilled_tokens"] == s["prompt_tokens"] - s["reused_tokens"] < 20
    assert s["cache"]["bits"] == 8  # the session keeps its cache layout
