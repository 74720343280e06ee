"""common.py: config overrides, the learning-rate schedule, the logger, and DDP gradient averaging."""
import json
import math
import os
import subprocess
import sys

import re
import types

import pytest
import torch

import common
from common import (ConfigError, Diverged, Logger, check_finite, configure_optimizer, eval_mode, global_std, lr_at,
                    optimizer_step, parse_config, setup_runtime, subset)

DEFAULTS = dict(device="cpu", dtype="auto", lr=1e-3, batch_size=8, compile=False, out_dir="out")


def test_overrides_are_typed():
    cfg = parse_config(DEFAULTS, ["--lr=3e-4", "--batch_size=4", "--compile=true", "--out_dir=x"], verbose=False)
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.out_dir) == (3e-4, 4, True, "x")
    assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int)
    assert cfg.dtype == "float32"  # auto on CPU


def test_int_given_to_float_key_is_a_float():
    assert parse_config(DEFAULTS, ["--lr=1"], verbose=False).lr == 1.0


@pytest.mark.parametrize("arg, words", [
    ("--nope=1", ["unknown config key --nope", "batch_size", "lr"]),   # lists the valid keys
    ("--batch_size=2.5", ["--batch_size=2.5", "int"]),
    ("--lr=fast", ["--lr=fast", "float"]),
    ("--compile=maybe", ["--compile=maybe", "bool"]),
    ("lr=1", ["--key=value"]),
])
def test_bad_overrides_are_clear_errors(arg, words):
    with pytest.raises(ConfigError) as e:
        parse_config(DEFAULTS, [arg], verbose=False)
    for w in words:
        assert w in str(e.value)


def test_cuda_overrides_apply_only_on_cuda_and_the_command_line_wins(monkeypatch):
    cuda = dict(batch_size=64, lr=6e-4)
    cpu = parse_config(DEFAULTS, [], cuda_overrides=cuda, verbose=False)
    assert cpu.batch_size == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, for the config logic only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = parse_config(DEFAULTS, ["--device=cuda", "--lr=1e-5"], cuda_overrides=cuda, verbose=False)
    assert (gpu.batch_size, gpu.lr, gpu.dtype) == (64, 1e-5, "bfloat16")


def test_cuda_on_a_machine_without_it_says_what_to_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available.*--device=cpu"):
        parse_config(DEFAULTS, ["--device=cuda"], verbose=False)
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        parse_config(DEFAULTS, ["--device=gpu"], verbose=False)


def _rt():
    return types.SimpleNamespace(ddp=False, rank=0, world_size=1, master=True, device="cpu", device_type="cpu")


def _model_with_grads(scale):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)
    return model


def test_optimizer_step_without_clipping_uses_the_gradient_as_it_is():
    """grad_clip=0 means no clipping: the step equals plain SGD on the unchanged gradient (it once multiplied
    every gradient by zero)."""
    model = _model_with_grads(3.0)
    before = [p.detach().clone() for p in model.parameters()]
    norm = optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, _rt(), step=0)
    assert norm == pytest.approx(3.0 * math.sqrt(15))  # 15 entries of 3.0
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.1 * 3.0)
        assert p.grad is None  # zeroed (set to None) after the step


def test_optimizer_step_clips_to_the_norm():
    model = _model_with_grads(3.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), 1.0, _rt(), step=0)
    step = torch.cat([(b - p.detach()).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(1.0, rel=1e-5)  # the gradient rescaled to norm 1


def test_a_non_finite_gradient_stops_before_the_weights_change():
    model = _model_with_grads(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Diverged, match="step 7: grad_norm = nan"):
        optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, _rt(), step=7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(Diverged, match="step 3: loss = inf"):
        check_finite(3, loss=float("inf"), other=1.0)
    check_finite(3, loss=torch.tensor(2.0))  # finite: no error


def test_global_std_in_one_process_is_the_sample_std():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3 + 10
    assert global_std(x, _rt()) == pytest.approx(x.std().item(), rel=1e-6)


def test_global_std_of_a_constant_is_zero():
    """Exactly 0 for float32 scores (what a rollout has), and no nan from 0 / 0 with one entry. The one-pass
    sum-of-squares form gave 4.9e-8 for seven scores of 3.3 and 1.4e-6 for 1000 of 123.456: a 'spread' that
    ppo.score_scale would have divided every score by."""
    for n in (1, 2, 7, 64, 1000):
        for value in (3.0, 3.3, 0.1, -12.25, 123.456):
            assert global_std(torch.full((n,), value), _rt()) == 0.0, (n, value)
    x = torch.full((1000,), 123.456, dtype=torch.float64)
    assert global_std(x, _rt()) < 1e-12 * 123.456


@pytest.mark.parametrize("dtype", ["float16", "fp16"])
def test_float16_is_refused_and_bfloat16_offered(dtype):
    with pytest.raises(ConfigError) as e:
        setup_runtime(types.SimpleNamespace(device="cpu", dtype=dtype, seed=0))
    assert f"--dtype={dtype}" in str(e.value) and "bfloat16" in str(e.value)
    assert setup_runtime(types.SimpleNamespace(device="cpu", dtype="bfloat16", seed=0)).dtype == torch.bfloat16


def test_eval_mode_restores_each_models_mode():
    a, b = torch.nn.Dropout(), torch.nn.Dropout()
    b.eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training


def test_subset_is_fixed_and_takes_all_for_zero():
    xs = list(range(100))
    assert subset(xs, 10) == subset(xs, 10) and len(set(subset(xs, 10))) == 10
    assert sorted(subset(xs, 0)) == xs and sorted(subset(xs, 500)) == xs


def test_lr_schedule_closed_form():
    lr, warm, total = 1.0, 10, 110
    assert lr_at(0, total, lr, warm) == pytest.approx(0.1)
    assert lr_at(9, total, lr, warm) == pytest.approx(1.0)
    assert lr_at(10, total, lr, warm) == pytest.approx(1.0)            # cosine starts at the peak
    assert lr_at(60, total, lr, warm) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(110, total, lr, warm) == pytest.approx(0.1)           # ends at 10% of the peak
    assert lr_at(500, total, lr, warm) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, LN weight, LN bias


def test_logger_writes_jsonl_and_png(tmp_path):
    log = Logger(str(tmp_path), "demo")
    for step in range(3):
        log.log(step, loss=1.0 / (step + 1), lr=torch.tensor(0.5), sample="text is kept, not plotted")
    log.log(3, test_loss=0.25)  # logged once: a panel with one point
    drawn, constant = log.plot()
    assert drawn == ["loss", "test_loss"] and constant == {"lr": 0.5}  # lr never changed: in the title, no panel
    rows = [json.loads(line) for line in open(tmp_path / "demo_log.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["loss"] == pytest.approx(1 / 3) and rows[0]["lr"] == 0.5 and rows[0]["sample"]
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_in_sync(tmp_path):
    """torchrun --nproc_per_node=2 with gloo: ranks see different data, yet end with identical weights,
    equal to one process training on the union of their batches (the mean of the two gradients)."""
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port
           worker, str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    single = torch.load(tmp_path / "single.pt")
    for k in w0:
        # Adam steps are ~lr = 1e-2 each; without the gradient average the weights differ by that much
        torch.testing.assert_close(w0[k], single[k], rtol=0, atol=1e-4)
    std = torch.load(tmp_path / "std.pt")
    assert std["global"] == pytest.approx(std["union"], rel=1e-6)


def test_a_renamed_flag_says_what_replaced_it():
    """One name per idea: --eval_interval became --eval_every in every stage; the old name is a one-line error that
    names the new one, not an 'unknown key'."""
    import sft
    with pytest.raises(ConfigError, match=r"--eval_interval was renamed --eval_every.*--eval_every=5"):
        parse_config(sft.config, ["--eval_interval=5"], verbose=False)
    assert parse_config(sft.config, ["--eval_every=5"], verbose=False).eval_every == 5
    import dpo  # and --log_interval became --log_every (dpo.py's last *_interval)
    with pytest.raises(ConfigError, match=r"--log_interval was renamed --log_every.*--log_every=2"):
        parse_config(dpo.config, ["--log_interval=2"], verbose=False)
    assert parse_config(dpo.config, ["--log_every=2"], verbose=False).log_every == 2


# ----------------------------------------------------------------------------- declared settings
def outside(rule, is_int):
    """Values just outside a setting's `allowed` text, worked out here from the text itself."""
    if "|" in rule:
        return ["nope"]
    step = 1 if is_int else 0.5
    rule = rule.strip()
    if rule[0] in "<>":
        op, bound = rule.split()
        b = float(bound)
        return [{">": b, ">=": b - step, "<": b, "<=": b + step}[op]]
    low, high = (x.strip() for x in rule[1:-1].split(","))
    return [float(low) - (step if rule[0] == "[" else 0), float(high) + (step if rule[-1] == "]" else 0)]


STAGES = ["sft", "ppo", "dpo", "reward", "lab", "sample"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_setting_of_a_stage_rejects_an_out_of_range_value_in_one_line(stage):
    """Each int / float setting of the stage's config (common.SHARED's included) declares what it allows
    (common.setting), and parse_config refuses a value just outside it (and nan) with a one-line ConfigError naming
    the flag; a choice refuses a word it does not list. The presets themselves are allowed."""
    import importlib
    module = importlib.import_module(stage)
    numeric = [k for k, v in module.config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert [k for k in numeric if common.allowed(module.config, k) is None] == []  # every one declared
    declared = [k for k in module.config if common.allowed(module.config, k)]
    assert set(numeric) <= set(declared)
    for key in declared:
        is_int = isinstance(module.config[key], int)
        bad = outside(common.allowed(module.config, key), is_int)
        bad += ["nan"] if not is_int and not isinstance(module.config[key], str) else []
        for value in bad:
            value = int(value) if is_int else value
            with pytest.raises(ConfigError) as e:
                parse_config(module.config, [f"--{key}={value}"], verbose=False)
            assert str(e.value).startswith(f"--{key}=") and "\n" not in str(e.value), (key, value, str(e.value))
    for argv in ([], ["--device=cuda"]):  # the CPU preset, and the CUDA one (pretending, for the config logic only)
        import unittest.mock
        with unittest.mock.patch.object(torch.cuda, "is_available", lambda: True), \
                unittest.mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True):
            parse_config(module.config, argv, cuda_overrides=getattr(module, "cuda_config", None), verbose=False)


def test_a_declared_setting_works_as_its_default_and_a_config_without_declarations_as_before():
    lr, k, name = common.setting(1e-3, "> 0"), common.setting(4, "[1, 8]"), common.setting("a", "a | b")
    assert lr * 2 == 2e-3 and k + 1 == 5 and name + "x" == "ax" and f"{lr} {k} {name}" == "0.001 4 a"
    assert isinstance(lr, float) and isinstance(k, int) and isinstance(name, str)
    cfg = parse_config(dict(DEFAULTS, lr=lr, k=k, name=name), ["--k=8", "--name=b"], verbose=False)
    assert (cfg.lr, cfg.k, cfg.name) == (1e-3, 8, "b") and type(cfg.lr) is float and type(cfg.k) is int
    assert type(cfg.name) is str  # plain values: what checkpoints store
    for arg, words in (("--lr=0", "--lr=0.0: expected a value > 0"), ("--k=9", "--k=9: expected a value in [1, 8]"),
                       ("--name=c", "--name=c: expected one of a, b"), ("--lr=inf", "--lr=inf: expected a finite")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_config(dict(DEFAULTS, lr=lr, k=k, name=name), [arg], verbose=False)
    plain = parse_config(DEFAULTS, ["--batch_size=-5", "--lr=-1"], verbose=False)  # no declaration: any value
    assert (plain.batch_size, plain.lr) == (-5, -1.0)
    for bad in ((0.5, "> 1"), (1, "between 0 and 1"), (True, ">= 0")):
        with pytest.raises(ValueError):
            common.setting(*bad)


def test_the_imports_go_one_way_checkpoint_to_common():
    """checkpoint.py (checkpoints and the training state: save, restore, resume, RNG states) imports common.py
    (configuration, runtime, logging); common.py imports nothing of the checkpoints, not even inside a function."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, common; assert 'checkpoint' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert "checkpoint import" not in open(os.path.join(root, "common.py")).read()
    import checkpoint
    for name in ("save_training_state", "restore_training_state", "resume_checkpoint", "start_training",
                 "checkpoint_due", "rng_state", "set_rng_state"):
        assert hasattr(checkpoint, name) and not hasattr(common, name), name
