"""sample.py: every policy of a run answers the same prompts with the same random numbers, prompts come from the flag,
a file or the terminal, hh questions are framed, imdb answers carry the judge's log-odds, and a user's mistakes are
one line and exit status 2."""
import io
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import common
import data
import sample
from checkpoint import save_checkpoint
from model import GPT, GPTConfig

V = 512  # a cut GPT-2 vocabulary: tiny embeddings, real BPE


def tiny(seed, scalar_head=False):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, n_tokens=V, padded_vocab_size=V,
                         scalar_head=scalar_head))


def write_run(out_dir, task="hh"):
    """A run folder: sft.pt, ppo.pt (a byte copy of sft.pt), dpo.pt (other weights), rm.pt. Returns out_dir (str)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = dict(task=task)
    save_checkpoint(os.path.join(out_dir, "sft.pt"), tiny(0), cfg, "sft")
    shutil.copy(os.path.join(out_dir, "sft.pt"), os.path.join(out_dir, "ppo.pt"))
    save_checkpoint(os.path.join(out_dir, "dpo.pt"), tiny(1), cfg, "dpo")
    save_checkpoint(os.path.join(out_dir, "rm.pt"), tiny(2, scalar_head=True), cfg, "rm")
    return str(out_dir)


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run")


def args(out_dir, *extra, task="hh", **kw):
    flags = dict(dict(task=task, out_dir=out_dir, device="cpu", vocab_size=V, max_new_tokens=8, num_samples=3), **kw)
    return [f"--{k}={v}" for k, v in flags.items()] + list(extra)


def test_the_same_seed_gives_the_same_answers_and_every_policy_the_same_random_numbers(run, one_thread):
    first = sample.main(args(run, "--prompt=Tell me about tea", seed=7))
    assert list(first) == ["sft", "ppo", "dpo"]  # every policy found, in pipeline order
    again = sample.main(args(run, "--prompt=Tell me about tea", seed=7))
    for name in first:
        assert first[name]["responses"] == again[name]["responses"]
        assert torch.equal(first[name]["scores"], again[name]["scores"])
    # ppo.pt is a copy of sft.pt: the same random numbers give the same answers, though sampled after sft's
    assert first["ppo"]["responses"] == first["sft"]["responses"]
    assert first["dpo"]["responses"] != first["sft"]["responses"]  # other weights, other answers
    assert len(first["sft"]["responses"]) == 3 and len(set(map(tuple, first["sft"]["responses"]))) > 1
    other_seed = sample.main(args(run, "--prompt=Tell me about tea", seed=8))
    assert other_seed["sft"]["responses"] != first["sft"]["responses"]
    # a checkpoint by path (a lab run's policy, say) under another label: the same answers again
    copy = os.path.join(os.path.dirname(run), "elsewhere.pt")
    shutil.copy(os.path.join(run, "sft.pt"), copy)
    by_path = sample.main(args(run, "--prompt=Tell me about tea", seed=7, policies=f"dpo,{copy}"))
    assert list(by_path) == ["dpo", copy[:-3]]
    assert by_path[copy[:-3]]["responses"] == first["sft"]["responses"]
    assert by_path["dpo"]["responses"] == first["dpo"]["responses"]


def test_prompts_from_the_flag_from_repeated_flags_and_from_a_file_give_the_same_answers(run, tmp_path, capsys,
                                                                                           one_thread):
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me about tea\n\nWhat is a kite?\n")  # a blank line is skipped
    from_file = sample.main(args(run, f"--prompt=FILE:{path}", num_samples=2, policies="sft"))
    out = capsys.readouterr().out
    assert "PROMPT '\\n\\nHuman: Tell me about tea\\n\\nAssistant:'" in out and "means over every answer (2 prompts x 2)" in out
    joined = sample.main(args(run, "--prompt=Tell me about tea|What is a kite?", num_samples=2, policies="sft"))
    repeated = sample.main(args(run, "--prompt=Tell me about tea", "--prompt=What is a kite?", num_samples=2,
                                policies="sft"))
    assert len(from_file["sft"]["responses"]) == 4
    assert from_file["sft"]["responses"] == joined["sft"]["responses"] == repeated["sft"]["responses"]
    # a prompt's answers do not depend on the other prompts
    alone = sample.main(args(run, "--prompt=What is a kite?", num_samples=2, policies="sft"))
    assert alone["sft"]["responses"] == joined["sft"]["responses"][2:]


def test_the_interactive_loop_answers_each_line_and_ends_cleanly_on_eof(run, monkeypatch, capsys, one_thread):
    too_long = "tea " * 80  # more tokens than the context of 64
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Tell me about tea\n\n{too_long}\nWhat is a kite?\n"))
    typed = sample.main(args(run, num_samples=2))
    captured = capsys.readouterr()
    assert captured.out.count("prompt> ") == 5  # four lines, then EOF
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "--max_new_tokens" in errors[0]
    flagged = sample.main(args(run, "--prompt=Tell me about tea|What is a kite?", num_samples=2))
    for name in ("sft", "ppo", "dpo"):
        assert typed[name]["responses"] == flagged[name]["responses"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # EOF at once: nothing to answer, no error
    assert sample.main(args(run)) == {}


def test_hh_frames_a_bare_question_and_keeps_a_framed_one():
    cfg = types.SimpleNamespace(task="hh", vocab_size=V, max_new_tokens=8)
    text, tokens = sample.encode_prompt("  How do I bake bread? ", cfg, context=64)
    assert text == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert data.decode(tokens, V) == text
    framed = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tea?\n\nAssistant:"
    assert sample.encode_prompt(framed, cfg, context=64)[0] == framed.strip()
    imdb = types.SimpleNamespace(task="imdb", vocab_size=V, max_new_tokens=8)
    assert sample.encode_prompt("This movie was ", imdb, context=64)[0] == "This movie was"


def test_imdb_answers_carry_the_gold_judges_log_odds(imdb_root, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # the judge's cache goes to ./data/cache
    out_dir = write_run(tmp_path / "imdb_run", task="imdb")
    result = sample.main(args(out_dir, "--prompt=This movie was", task="imdb", data_dir=imdb_root))
    judge = data.load_judge(imdb_root, verbose=False)
    prompt = data.get_tokenizer(V).encode_ordinary("This movie was")
    for name, r in result.items():
        assert r["gold"].shape == r["scores"].shape == (3,)
        texts = [data.decode(prompt + answer, V) for answer in r["responses"]]
        assert torch.allclose(r["gold"], judge.log_odds(texts))
    out = capsys.readouterr().out
    assert "gold" in out and "RM" in out and "positive" in out  # per answer, per policy, and the summary


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(lambda: sample.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case, words", [
    ("no run folder", ["no run folder", "python ppo.py"]),
    ("no policy", ["no policy in", "--policies"]),
    ("missing policy", ["not found", "python ppo.py"]),
    ("another stage", ["is a rm checkpoint", "expected"]),
    ("another vocabulary", ["vocabulary of 512 tokens", "--vocab_size=512"]),
    ("another task", ["trained on --task=hh", "--task=hh"]),
    ("empty prompt", ["empty prompt"]),
    ("empty item", ["empty prompt", "|"]),
    ("blank prompt", ["empty prompt"]),
    ("missing file", ["cannot read it", "one prompt per line"]),
    ("empty file", ["holds no prompt"]),
    ("prompt too long", ["exceeds the models' context of 64", "--max_new_tokens"]),
    ("answer too long", ["exceeds the models' context of 64", "--max_new_tokens=60"]),
    ("no samples", ["--num_samples=0"]),
])
def test_each_mistake_is_one_line_and_exit_status_2(case, words, run, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    os.makedirs(tmp_path / "bare")
    argv = {"no run folder": args(str(tmp_path / "nowhere"), "--prompt=hi"),
            "no policy": args(str(tmp_path / "bare"), "--prompt=hi"),
            "missing policy": args(run, "--prompt=hi", policies="sft,ppo_gold"),
            "another stage": args(run, "--prompt=hi", policies="rm"),
            "another vocabulary": args(run, "--prompt=hi", vocab_size=1024),
            "another task": args(run, "--prompt=hi", task="imdb"),
            "empty prompt": args(run, "--prompt="),
            "empty item": args(run, "--prompt=hi||there"),
            "blank prompt": args(run, "--prompt=   "),
            "missing file": args(run, f"--prompt=FILE:{tmp_path / 'nope.txt'}"),
            "empty file": args(run, f"--prompt=FILE:{tmp_path / 'empty.txt'}"),
            "prompt too long": args(run, "--prompt=" + "tea " * 80),
            "answer too long": args(run, "--prompt=hi", max_new_tokens=60),
            "no samples": args(run, "--prompt=hi", num_samples=0)}[case]
    err = one_line_error(argv, capsys)
    assert all(w in err for w in words), err


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    """The real command: `python sample.py` with no run folder (no traceback)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'nowhere'}", "--prompt=hi",
                        "--device=cpu"], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: no run folder"), p.stderr
