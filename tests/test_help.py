"""--help on every script: one line per setting, its words read from the comment of its config line; and the
one-line errors of a mistyped flag, which point to --help."""
import importlib
import os
import subprocess
import sys
import time

import pytest

import common
from common import ConfigError, parse_config, setting_comments, setting_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sft", "reward", "ppo", "dpo", "lab", "ladder", "sample", "evaluate", "bench"]
# every dict of settings a script parses from the command line: (module, variable); evaluate.py's are SHARED's
DECLARATIONS = [(name, "config") for name in SCRIPTS if name != "evaluate"] + [("bench", "GPU_DRY_RUN"),
                                                                              ("common", "SHARED")]


def undocumented(defaults, path, name):
    """The keys of `defaults` that have no words for --help (the check every declaration must pass)."""
    return [key for key, (_, words) in setting_docs(defaults, path, name).items() if not words]


@pytest.mark.parametrize("module, name", DECLARATIONS)
def test_every_setting_of_every_script_has_a_help_line(module, name):
    m = importlib.import_module(module)
    assert undocumented(getattr(m, name), m.__file__, name) == []


FAKE = '''import common
from common import setting
config = dict(common.SHARED,  # a remark about the dict, no key's
    first=setting(1, ">= 0"),        # the first key
    # a heading
    # on two lines
    alpha=setting(0.5, "[0, 1]"),    # how much alpha
                                     # (more words)
    beta=2,
    gamma="x", delta=3,              # delta's words
    # another heading
    eps=setting(1e-3, "> 0"),  # eps's words
)
other = dict(zeta=1)  # not config
'''


def test_the_extractor_reads_comments_headings_and_continuations_and_the_check_fails_on_a_bare_key(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    assert setting_comments(str(path), "config") == {
        "first": ("", "the first key"),
        "alpha": ("a heading on two lines", "how much alpha (more words)"),
        "beta": ("a heading on two lines", ""),
        "gamma": ("a heading on two lines", ""),  # the comment belongs to the last key of its line
        "delta": ("a heading on two lines", "delta's words"),
        "eps": ("another heading", "eps's words"),
    }
    defaults = dict(common.SHARED, first=1, alpha=0.5, beta=2, gamma="x", delta=3, eps=1e-3)
    assert undocumented(defaults, str(path), "config") == ["beta", "gamma"]
    docs = setting_docs(defaults, str(path), "config")
    assert docs["first"] == ("fake.py", "the first key")  # before the first heading: the file's name
    assert docs["task"] == (common.SHARED_HEADING, "IMDb sentiment (with a gold judge) | Anthropic HH-RLHF")
    with pytest.raises(ValueError, match="no top-level `cuda_config = dict\\(`"):
        setting_comments(str(path), "cuda_config")


def help_of(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_a_line_per_setting_and_nothing_else_done(module, flag, capsys, tmp_path, monkeypatch):
    importlib.import_module(module)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    out = help_of(module, ["--lr=oops", flag], capsys)  # --help wins over any other flag, even a bad one
    assert time.perf_counter() - t0 < 1.0
    assert os.listdir(tmp_path) == []  # no out/, no data
    assert f"python {module}.py" in out  # the usage lines of its docstring
    keys = ["device", "seed", "vocab_size"] + (["beta", "lr"] if module == "ppo" else [])
    for key in keys:
        assert sum(line.startswith(f"  --{key}=") for line in out.splitlines()) == 1, key


def test_ppo_help_shows_defaults_the_cuda_preset_allowed_values_and_words(capsys):
    lines = help_of("ppo", ["--help"], capsys).splitlines()
    line = lambda key: next(line for line in lines if line.startswith(f"  --{key}="))
    assert line("beta").split() == ("--beta=0.2 >= 0 KL coefficient (initial value when adaptive_kl); README: KL for "
                                    "each beta").split()
    assert line("lr").split()[:4] == ["--lr=0.0005", "[CUDA:", "1e-05]", ">="]
    assert line("vocab_size").split()[:4] == ["--vocab_size=8192", "[CUDA:", "50257]", "[257,"]
    assert line("adaptive_kl").split()[:4] == ["--adaptive_kl=False", "True", "|", "False"]
    assert "(0 = only at the last)" in line("sample_every")  # the continuation line of its comment
    assert "tokens of prompt + response the models see" in line("block_size")  # common.SHARED's words
    assert lines.index("rollout") < lines.index(line("iterations")) < lines.index("reward")  # the config's headings
    assert lines.index(common.SHARED_HEADING) < lines.index(line("task"))


def test_help_from_the_command_line(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "ppo.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == ""
    assert any(line.split()[:3] == ["--beta=0.2", ">=", "0"] for line in res.stdout.splitlines())


DEFAULTS = dict(device="cpu", lr=1e-3, batch_size=8, beta=0.1)


@pytest.mark.parametrize("argv, words", [
    (["--lr"], "bad argument '--lr': expected --key=value"),
    (["--lr", "3e-4"], "bad argument '--lr' '3e-4': expected --key=value, here --lr=3e-4"),
    (["lr=3e-4"], "bad argument 'lr=3e-4': expected --key=value"),
    (["--betas=0.1"], "unknown config key --betas: did you mean --beta?"),
    (["--nope=1"], "unknown config key --nope: valid keys: batch_size, beta, device, lr"),
])
def test_a_mistyped_flag_is_one_line_that_points_to_help(argv, words):
    with pytest.raises(ConfigError) as e:
        parse_config(DEFAULTS, argv, verbose=False)
    assert str(e.value) == f"{words} (see --help)"


def test_a_near_miss_of_a_real_script_names_its_key():
    import ppo
    with pytest.raises(ConfigError, match=r"did you mean --beta\? \(see --help\)$"):
        parse_config(ppo.config, ["--betas=0.1"], verbose=False)
