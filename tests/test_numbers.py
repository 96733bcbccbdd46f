"""Non-finite or out-of-range numbers in flags, the settings file and a session's
index: one sentence naming the setting, its range and the value, never a traceback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from app.settings import Settings, settings_path
from mlx_cache import CacheConfig, CacheConfigError
from mlx_cache.memory import parse_size
from mlx_cache.store import SessionStore
from models.chat import Chat
from models.engine import Engine
from models.sample import GREEDY, SamplingConfig

BAD_FLAGS = [
    (("--temp", "nan"), "--temp must be a number from 0 to 100, not nan."),
    (("--temp", "inf"), "not inf"),
    (("--temp", "-0.5"), "not -0.5"),
    (("--temp", "1e400"), "not 1e400"),
    (("--top-p", "0"), "--top-p must be a number above 0 and at most 1, not 0."),
    (("--top-p", "nan"), "not nan"),
    (("--min-p", "1"), "--min-p must be a number from 0 to below 1, not 1."),
    (("--min-p", "-0.5"), "not -0.5"),
    (("--repetition-penalty", "inf"), "--repetition-penalty must be a number from 0.01 to 100, not inf."),
    (("--repetition-penalty", "0"), "not 0"),
    (("--seed", "-1"), "--seed must be a whole number from 0 to 18,446,744,073,709,551,615, not -1."),
    (("--seed", "1.5"), "not 1.5"),
    (("--max-tokens", "0"), "--max-tokens must be a whole number from 1 to 10,000,000, not 0."),
    (("--max-tokens", "nan"), "not nan"),
    (("--window", "0"), "--window must be a whole number from 1 to 10,000,000, not 0."),
    (("--window", "1e9"), "not 1e9"),
    (("--sinks", "-1"), "--sinks must be a whole number from 0"),
    (("--kv-bits", "16"), "--kv-bits must be a whole number from 2 to 8, not 16."),
    (("--k-bits", "nan"), "--k-bits must be"),
    (("--kv-group-size", "inf"), "--kv-group-size must be a whole number from 32 to 128, not inf."),
    (("--kv-keep-fp", "-2"), "--kv-keep-fp must be"),
    (("--kv-budget", "nan"), "--kv-budget must be a size above 0 such as 2GB, 512MB or 1073741824, not nan."),
    (("--kv-budget", "inf"), "not inf"),
    (("--kv-budget", "0"), "not 0"),
    (("--kv-budget", "1e400GB"), "not 1e400GB"),
]


def main_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Run kvchat's main in this process; a flag error ends it while parsing."""
    from app.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_number_in_a_flag_is_one_sentence_and_exit_2(flag, needle, capsys):
    for argv in (["ask", "hi", *flag], [*flag, "ask", "hi"]):  # after the command, or before it
        code, err = main_exit(argv, capsys)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"kvchat: {flag[0]} ") and needle in lines[0], err
        assert lines[0].endswith(".") and "Traceback" not in err


def test_the_app_and_info_check_their_flags_too(capsys):
    code, err = main_exit(["--temp", "nan"], capsys)  # no command: the app, which never starts
    assert code == 2 and err.strip() == "kvchat: --temp must be a number from 0 to 100, not nan."
    code, err = main_exit(["info", "--kv-budget", "-1"], capsys)
    assert code == 2 and err.strip().startswith("kvchat: --kv-budget must be a size above 0")


def test_good_numbers_still_pass(capsys):
    from app.cli import build_parser
    from app.cli.flags import sampling_from

    args = build_parser().parse_args(["ask", "hi", "--temp", "0", "--top-p", "1", "--min-p", "0",
                                      "--repetition-penalty", "1.3", "--seed", str(2**64 - 1),
                                      "--max-tokens", "7", "--window", "128", "--kv-budget", "1.5GB"])
    s = sampling_from(args)
    assert (s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.seed, s.max_tokens) == (
        0.0, 1.0, 0.0, 1.3, 2**64 - 1, 7)
    assert args.window == 128 and parse_size(args.kv_budget) == 1_500_000_000


@pytest.mark.parametrize("args", [("ask", "hi", "--temp", "nan"), ("ask", "hi", "--repetition-penalty", "inf"),
                                  ("info", "--kv-budget", "nan")])
def test_the_real_command_line_says_one_sentence(args, tmp_path):
    env = dict(os.environ, KVCHAT_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and args[-2] in r.stderr and args[-1] in r.stderr


def test_configs_refuse_non_finite_and_out_of_range_values():
    for bad in ({"temperature": math.nan}, {"temperature": math.inf}, {"top_p": 1.5}, {"min_p": -0.1},
                {"repetition_penalty": math.inf}, {"max_tokens": 2.0}, {"max_tokens": True}, {"seed": -1},
                {"repetition_context": 0}, {"stop": "x"}, {"temperature": "hot"}):
        with pytest.raises(ValueError) as e:
            SamplingConfig.from_dict(bad)
        assert str(e.value).endswith(".") and repr(next(iter(bad.values())))[:3].strip("'") in str(e.value)
    for bad in ({"window": 1e30}, {"window": 0}, {"sinks": -1}, {"keep_fp": math.nan}, {"k_bits": 4.0},
                {"group_size": True}, {"rotate": "yes"}, {"window": 10**12}):
        with pytest.raises(CacheConfigError):
            CacheConfig.from_dict(bad)


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"sampling": {"temperature": NaN}}', "not nan"),
        ('{"sampling": {"top_p": Infinity}}', "top-p must be a number above 0 and at most 1, not inf"),
        ('{"sampling": {"max_tokens": 0}}', "max-tokens must be"),
        ('{"cache": {"kind": "rotating", "window": 1e30}}', "The rotating window must be"),
        ('{"kv_budget": "nan"}', "'nan' is not a size"),
        ('{"kv_budget": "0"}', "above 0"),
    ],
)
def test_a_bad_number_in_the_settings_file_means_defaults_and_one_sentence(content, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path))
    settings_path().write_text(content)
    settings, problem = Settings.load()
    assert settings == Settings()
    assert problem and needle in problem and str(settings_path()) in problem and problem.endswith(".")
    assert len(problem.splitlines()) == 1


def test_out_of_range_sampling_in_an_index_falls_back_with_a_note(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    store = SessionStore(tmp_path)
    chat = Chat.open(Engine(lm), store, "s", sampling=GREEDY.with_(max_tokens=4))
    list(chat.send("hi"))
    sampling = dict(chat.sampling.to_dict(), temperature=-3.0, top_p=7.0)
    store.save("s", messages=list(chat.messages), tokens=list(chat.state.tokens), caches=chat.state.caches,
               cache_config=chat.state.config, model_name=lm.name, model_fingerprint=lm.fingerprint,
               sampling=sampling, title="t", created=chat.created, checkpoint=chat.state.checkpoint)
    chat.close()
    again = Chat.open(Engine(lm), store, "s")
    try:
        default = SamplingConfig()
        assert again.sampling.temperature == default.temperature and again.sampling.top_p == default.top_p
        assert again.sampling.max_tokens == 4 and again.sampling.repetition_penalty == 1.0  # the good ones stay
        note = again.notice or ""
        assert "not -3.0" in note and "not 7.0" in note and "defaults" in note and note.endswith(".")
        fin = list(again.send("more"))[-1]  # the turn runs, and saves usable settings
        assert fin.stats.generated_tokens >= 1
    finally:
        again.close()
    assert json.loads(json.dumps(store.read("s").sampling))["temperature"] == default.temperature
