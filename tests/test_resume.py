"""What every stage promises (common.py's reliability contract): checkpoints that survive a kill, --resume that
reaches the same final step (and, with the RNG states restored, the very same weights as a run never interrupted),
a run that diverges stopping before it spoils anything, and a user's mistake printed as one line with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import dpo
import ppo
import reward
import sft
from checkpoint import load_checkpoint, save_checkpoint
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = dict(task="hh", device="cpu", n_layer=1, n_head=2, n_embd=32, block_size=64, max_prompt_len=32, pretrain_iters=4,
                pretrain_batch_size=2, pretrain_lr=1e-2, sft_iters=6, batch_size=4, lr=5e-3, eval_every=0,
                eval_examples=8, eval_batch_size=16, n_answers=1, max_new_tokens=4, checkpoint_every=2)


def argv(settings, **over):
    return [f"--{k}={v}" for k, v in {**settings, **over}.items()]


VOCAB = dict(n_tokens=8192, padded_vocab_size=8192)  # common.SHARED's default vocabulary


def tiny_sft_checkpoint(out, block_size=128):
    torch.manual_seed(0)
    save_checkpoint(os.path.join(out, "sft.pt"),
                    GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=32, **VOCAB)),
                    dict(block_size=block_size), "sft")


class Killed(Exception):
    """Stands in for a kill in the middle of a run (raised from inside the training loop)."""


def interrupt_at(monkeypatch, step):
    """Make common.optimizer_step raise Killed when it is asked to take step `step`, as a kill would."""
    real = common.optimizer_step

    def step_or_die(model, optimizer, grad_clip, rt, s):
        if s == step:
            raise Killed(f"killed at step {s}")
        return real(model, optimizer, grad_clip, rt, s)
    monkeypatch.setattr(common, "optimizer_step", step_or_die)


def same_weights(a, b, keys=("model",)):
    for key in keys:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


# ----------------------------------------------------------------------------- resume equals an unbroken run
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_a_run_killed_and_resumed_ends_where_an_unbroken_run_ends(stage, tmp_path, hh_dir, monkeypatch, one_thread):
    """Every stage: a run interrupted after its checkpoint at step 2 and resumed with --resume=True reaches the
    planned final step with the same weights (optimiser, step and RNG states restored) as a run never stopped."""
    monkeypatch.chdir(tmp_path)
    module, name, settings = {
        "sft": (sft, "sft.pt", SFT_TINY),
        "reward": (reward, "rm.pt", dict(task="hh", device="cpu", block_size=64, max_prompt_len=32, max_iters=5, batch_size=4,
                                         eval_every=0, eval_batch_size=16, norm_examples=8, n_show=0)),
        "dpo": (dpo, "dpo.pt", dict(task="hh", device="cpu", block_size=64, max_prompt_len=32, batch_size=4, max_iters=5,
                                    train_pairs=16, eval_pairs=8, eval_every=0, log_every=1, eval_prompts=4,
                                    max_new_tokens=4, eval_batch_size=8)),
        "ppo": (ppo, "ppo.pt", dict(task="hh", device="cpu", block_size=64, max_prompt_len=32, max_new_tokens=6, batch_size=4,
                                    minibatch_size=2, iterations=5, ptx_batch_size=2, ptx_block_size=16,
                                    eval_prompts=4, eval_batch_size=4, sample_every=100, adaptive_kl=True,
                                    kl_horizon=8)),
    }[stage]
    runs, reports = {}, {}
    for run in ("unbroken", "killed"):
        out = str(tmp_path / run)
        if stage != "sft":
            tiny_sft_checkpoint(out, 64)
        if stage == "ppo":
            torch.manual_seed(1)
            rm = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, scalar_head=True, **VOCAB))
            save_checkpoint(os.path.join(out, "rm.pt"), rm, {}, "rm")
        args = argv(settings, out_dir=out, data_dir=hh_dir, checkpoint_every=2)
        if run == "killed":
            with monkeypatch.context() as m:
                interrupt_at(m, 3)
                with pytest.raises(Killed):
                    module.main(args)
            ckpt = load_checkpoint(os.path.join(out, name))
            assert ckpt["step"] == 2 and not ckpt["finished"]  # the checkpoint of step 2 is on disk
            ckpt["seconds"] = ckpt.get("seconds", 0.0) + 1000  # as if the first part had run for 1000 s
            torch.save(ckpt, os.path.join(out, name))
            reports[run] = module.main(args + ["--resume=True"])
        else:
            reports[run] = module.main(args)
        runs[run] = load_checkpoint(os.path.join(out, name))
    final = {"sft": 10, "reward": 5, "dpo": 5, "ppo": 5}[stage]
    assert runs["killed"]["step"] == runs["unbroken"]["step"] == final and runs["killed"]["finished"]
    same_weights(runs["unbroken"], runs["killed"], ("model", "critic") if stage == "ppo" else ("model",))
    # the report's "before" is the model before the first step, not at the resume; its seconds count both parts
    before = [k for k in reports["unbroken"] if k.endswith("_before")]
    assert len(before) >= (0 if stage == "ppo" else 3), before
    assert {k: reports["killed"][k] for k in before} == {k: reports["unbroken"][k] for k in before}
    if stage in ("ppo", "dpo"):
        assert reports["killed"]["seconds"] > 1000 > reports["unbroken"]["seconds"]
    if stage == "ppo":  # beta (adaptive) and the score scale survive the resume
        assert runs["killed"]["beta"] == runs["unbroken"]["beta"] != 0.05
        assert runs["killed"]["score_scale"] == runs["unbroken"]["score_scale"]
    rows = [json.loads(line) for line in open(tmp_path / "killed" / f"{name[:-3]}_log.jsonl")]
    steps = [r["step"] for r in rows if any(k in r for k in ("loss", "score", "sft_loss", "pretrain_loss"))]
    assert steps == sorted(set(steps)) and steps[-1] == final - 1  # one row per step, none twice


@pytest.mark.slow
def test_sigkill_in_the_middle_then_resume_finishes_with_the_planned_step_count(tmp_path, hh_dir):
    """A real `kill -9` of `python sft.py` as soon as its first checkpoint is on disk; --resume=True finishes."""
    out = tmp_path / "out"
    args = argv(SFT_TINY, out_dir=str(out), data_dir=hh_dir, sft_iters=300, checkpoint_every=5)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py"), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (out / "sft.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(str(out / "sft.pt"))["step"]
    assert 0 < killed_at < 304
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), *args, "--resume=True"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {out / 'sft.pt'} at step {killed_at} of 304" in res.stdout
    ckpt = load_checkpoint(str(out / "sft.pt"))
    assert ckpt["step"] == 304 and ckpt["finished"]


def test_a_kill_while_the_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing step 2's checkpoint (half the bytes written): step 1's still loads."""
    path = tmp_path / "sft.pt"
    script = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import torch
from checkpoint import save_checkpoint
from model import GPT, GPTConfig
model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
save_checkpoint({str(path)!r}, model, {{}}, "sft", step=1)
def dying_save(obj, f):
    with open(f, "wb") as out:
        out.write(open({str(path)!r}, "rb").read()[:5000])
        out.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
save_checkpoint({str(path)!r}, model, {{}}, "sft", step=2)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert load_checkpoint(str(path), stage="sft")["step"] == 1


def test_resume_of_a_finished_run_does_nothing_and_says_so(tmp_path, hh_dir, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir))
    before = os.path.getmtime(os.path.join(out, "sft.pt")), open(os.path.join(out, "sft_log.jsonl")).read()
    capsys.readouterr()
    assert sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir, resume=True)) == {}
    assert "already finished, nothing to do" in capsys.readouterr().out
    after = os.path.getmtime(os.path.join(out, "sft.pt")), open(os.path.join(out, "sft_log.jsonl")).read()
    assert after == before


def test_a_checkpoint_of_another_vocabulary_is_one_line_and_exit_status_2(tmp_path):
    """`python reward.py --vocab_size=50257` against an sft.pt trained with the default 8192 tokens: its ids would
    mean other words. One line naming the file, both sizes and the flag that fixes it; status 2."""
    out = tmp_path / "out"
    tiny_sft_checkpoint(str(out), 64)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), "--vocab_size=50257", f"--out_dir={out}",
                          "--device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in (str(out / "sft.pt"), "8192 tokens", "--vocab_size=50257")), lines[0]


def test_the_pretraining_length_of_a_resumed_run_is_its_checkpoints(tmp_path, hh_dir, monkeypatch, capsys, one_thread):
    """sft.py decides whether a resumed run is done, and runs its loop, with one pretraining length: the checkpoint's.
    4 + 6 steps done, then --resume=True --pretrain_iters=0 --sft_iters=8: 4 + 8 = 12 steps, not 'already finished'
    by the config's 0 + 8 (a finished flag from one source and a loop from the other)."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir))
    capsys.readouterr()
    sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir, resume=True, pretrain_iters=0, sft_iters=8))
    assert "resuming" in capsys.readouterr().out
    ckpt = load_checkpoint(os.path.join(out, "sft.pt"))
    assert ckpt["step"] == 12 and ckpt["n_pretrain"] == 4 and ckpt["finished"]
    assert sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir, resume=True, pretrain_iters=9, sft_iters=8)) == {}
    assert "already finished" in capsys.readouterr().out  # 4 + 8 = 12 steps are done, whatever pretrain_iters says


# ----------------------------------------------------------------------------- divergence
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, hh_dir, monkeypatch,
                                                                                   one_thread):
    """`python sft.py --lr=1e4` trained on with loss=nan and died in tiktoken; now it stops at the first
    non-finite loss or gradient, and sft.pt keeps the last good (finite) weights."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(common.Diverged, match=r"training diverged at step \d+: (loss|grad_norm) = (nan|inf)"):
        sft.main(argv(SFT_TINY, out_dir=out, data_dir=hh_dir, pretrain_lr=1e4, lr=1e4, pretrain_iters=30,
                      checkpoint_every=1, grad_clip=0))
    ckpt = load_checkpoint(os.path.join(out, "sft.pt"))
    assert not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- one-line errors
def test_reward_and_dpo_start_from_one_load_sft(tmp_path):
    """checkpoint.load_sft is the SFT start of both reward.py and dpo.py: <out_dir>/sft.pt or the path given
    (reward.py's --sft_ckpt); dropout=0.0 (dpo.py) replaces the SFT model's, None (reward.py) keeps it; a
    --block_size beyond the model's is a UserError naming the file."""
    import checkpoint
    from types import SimpleNamespace
    assert reward.load_sft is dpo.load_sft is checkpoint.load_sft
    out = tmp_path / "out"
    save_checkpoint(str(out / "sft.pt"), GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.1,
                                                       **VOCAB)), dict(block_size=64), "sft")
    cfg = SimpleNamespace(out_dir=str(out), vocab_size=8192, block_size=64)
    path, ckpt = checkpoint.load_sft(cfg)
    assert path == str(out / "sft.pt") and ckpt["model_args"]["dropout"] == 0.1
    assert checkpoint.load_sft(cfg, dropout=0.0)[1]["model_args"]["dropout"] == 0.0
    os.replace(out / "sft.pt", tmp_path / "trunk.pt")
    assert checkpoint.load_sft(cfg, str(tmp_path / "trunk.pt"))[0] == str(tmp_path / "trunk.pt")
    with pytest.raises(common.UserError, match=r"sft\.pt not found.*python sft\.py"):
        checkpoint.load_sft(cfg)
    with pytest.raises(common.UserError, match=r"--block_size=128 exceeds the block_size 64 of .*trunk\.pt"):
        checkpoint.load_sft(SimpleNamespace(out_dir=str(out), vocab_size=8192, block_size=128),
                            str(tmp_path / "trunk.pt"))


def test_a_checkpoint_whose_weights_do_not_fit_is_one_line_and_exit_status_2(tmp_path, capsys):
    """model_from_checkpoint on a file whose weights do not fit its model_args (damaged, or of another version): a
    user's problem, so one line `error: ...` naming the stage and the command that writes it again, and status 2."""
    import checkpoint
    tiny_sft_checkpoint(str(tmp_path), 64)
    ckpt = load_checkpoint(str(tmp_path / "sft.pt"))
    del ckpt["model"]["transformer.h.0.attn.c_attn.weight"]
    with pytest.raises(SystemExit) as e:
        common.cli(lambda: checkpoint.model_from_checkpoint(ckpt))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "c_attn" in lines[0] and "python sft.py" in lines[0]


@pytest.mark.parametrize("script, args, words", [
    ("sft.py", ["--nope=1"], ["unknown config key --nope"]),
    ("ppo.py", ["--device=cuda"], ["CUDA is not available", "--device=cpu"]),
    ("reward.py", ["--out_dir=nowhere"], ["nowhere/sft.pt not found", "python sft.py"]),
    ("sft.py", ["--dtype=float16"], ["--dtype=float16", "bfloat16"]),
    # the bad input of issue 21: each once accepted, or a traceback
    ("ppo.py", ["--beta=-1"], ["--beta=-1.0", "expected a value >= 0"]),
    ("ppo.py", ["--iterations=-3"], ["--iterations=-3", "expected a value >= 1"]),
    ("ppo.py", ["--minibatch_size=0"], ["--minibatch_size=0", "expected a value >= 1"]),
    ("ppo.py", ["--lr=nan"], ["--lr=nan", "expected a finite float"]),
    ("dpo.py", ["--log_every=0"], ["--log_every=0", "expected a value >= 1"]),
    ("dpo.py", ["--log_interval=5"], ["--log_interval was renamed --log_every", "--log_every=5"]),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(script, args, words, tmp_path):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), res.stderr
