"""common.py: config overrides, the learning-rate schedule, the logger, and DDP gradient averaging."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import ConfigError, Logger, configure_optimizer, lr_at, parse_config

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


def test_cuda_overrides_apply_only_on_cuda_and_the_command_line_wins():
    cuda = dict(batch_size=64, lr=6e-4)
    cpu = parse_config(DEFAULTS, [], cuda_overrides=cuda, verbose=False)
    assert cpu.batch_size == 8
    gpu = parse_config(DEFAULTS, ["--device=cuda", "--lr=1e-5"], cuda_overrides=cuda, verbose=False)
    assert (gpu.batch_size, gpu.lr, gpu.dtype) == (64, 1e-5, "bfloat16")


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
    log.plot()
    rows = [json.loads(line) for line in open(tmp_path / "demo_log.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["loss"] == pytest.approx(1 / 3) and rows[0]["lr"] == 0.5 and rows[0]["sample"]
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_in_sync(tmp_path):
    """torchrun --nproc_per_node=2 with gloo: ranks see different data, yet end with identical weights,
    equal to one process training on the union of their batches (the mean of the two gradients)."""
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
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
