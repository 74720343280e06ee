"""sft.py against independent definitions: the masked loss as a loop over tokens, zero gradient on prompt
and padding, the target-only logits path against full logits, gradient accumulation (1 x 8 == 8 x 1),
the FLOPs formula, a tiny end-to-end run (with resume) and a two-process torchrun."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import sft
from common import setup_runtime
from common import UserError
from checkpoint import load_checkpoint
from model import GPT, GPTConfig

RT = setup_runtime(SimpleNamespace(device="cpu", dtype="float32", seed=0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


SFT_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sft.py")


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))


def fixture_examples(hh_dir):
    return data.load_hh_rlhf(hh_dir, block_size=64, max_prompt_len=32, cache_dir=None, verbose=False)["train"]


def loop_loss(logits, targets, mask):
    """- sum_t mask_t log p(y_t) / sum_t mask_t, one token at a time, in float64."""
    num, den = 0.0, 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                row = logits[b, t].double()
                logz = math.log(sum(math.exp(x) for x in (row - row.max()).tolist())) + row.max().item()
                num -= row[targets[b, t]].item() - logz
                den += 1
    return num / den


@pytest.mark.parametrize("pad_id", [0, 999])  # 999 is not even a token of this 17-word vocabulary
def test_sft_loss_equals_a_loop_over_tokens(pad_id):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 17
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[0, 2:5], mask[1, 1:7], mask[2, 4:6] = 1, 1, 1  # prompt before, padding after
    targets[mask == 0] = pad_id
    expected = loop_loss(logits, targets, mask)
    assert sft.sft_loss(logits, targets, mask).item() == pytest.approx(expected, rel=1e-5)
    sel = mask.bool()  # the training loop's form: logits of the target rows only, (N, V)
    assert sft.sft_loss(logits[sel], targets[sel], mask[sel]).item() == pytest.approx(expected, rel=1e-5)


def test_prompt_and_padding_get_zero_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    targets = torch.randint(11, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    sft.sft_loss(logits, targets, mask).backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1].abs().sum(-1) > 0)
    # closed form where it counts: d/dlogits = (softmax - onehot) / sum(mask)
    expected = (F.softmax(logits.detach(), -1) - F.one_hot(targets, 11)) / mask.sum()
    torch.testing.assert_close(logits.grad[mask == 1], expected[mask == 1])


def test_target_only_logits_equal_full_logits(hh_dir):
    examples = fixture_examples(hh_dir)[:5]
    model = tiny_gpt().eval()
    batch = data.collate_sft(examples, pad_id=4321)
    loss, n = sft.target_loss(model, batch)
    logits = model(batch["idx"], batch["attention_mask"])  # (B, T, V) full
    expected = loop_loss(logits[:, :-1], batch["idx"][:, 1:], batch["target_mask"][:, 1:])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert n.item() == sum(len(e["chosen"]) for e in examples)  # every response token, EOT included


def grads_of(model, micro_batches):
    model.zero_grad()
    loss = sft.accumulate_sft_gradients(model, micro_batches, RT)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_accumulation_one_by_eight_equals_eight_by_one(hh_dir):
    """Examples with different numbers of response tokens: the step's loss is one token-level mean over
    all of them, whatever the split into micro-batches (each micro-batch weighted by its share of tokens)."""
    examples = fixture_examples(hh_dir)
    examples = sorted(examples, key=lambda e: len(e["chosen"]))[::len(examples) // 8][:8]
    assert len({len(e["chosen"]) for e in examples}) > 1
    model = tiny_gpt()
    loss1, g1 = grads_of(model, [data.collate_sft(examples)])
    loss8, g8 = grads_of(model, [data.collate_sft([e]) for e in examples])
    assert loss1 == pytest.approx(loss8, rel=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g8[k], rtol=1e-4, atol=1e-7)
    # independent: the token-level mean over all examples, each run alone with full logits
    nll, count = 0.0, 0
    for e in examples:
        idx = torch.tensor([e["prompt"] + e["chosen"]])
        logp = F.log_softmax(model(idx)[0], -1)  # (T, V)
        P = len(e["prompt"])
        nll -= sum(logp[P + k - 1, tok].item() for k, tok in enumerate(e["chosen"]))
        count += len(e["chosen"])
    assert loss8 == pytest.approx(nll / count, rel=1e-5)
    # the naive mean of per-micro-batch means weights the examples differently: a different gradient
    model.zero_grad()
    for e in examples:
        (sft.target_loss(model, data.collate_sft([e]))[0] / 8).backward()
    assert not torch.allclose(model.transformer.wte.weight.grad, g1["transformer.wte.weight"], rtol=1e-3, atol=0)


def test_flops_formula_with_every_position_a_target():
    """With logits everywhere, flops = 6 N + 12 L T C per token (nanoGPT's estimate_mfu), where N counts
    the tied embedding once and not the position table."""
    model = tiny_gpt()
    c = model.config
    N = sum(p.numel() for n, p in model.named_parameters() if n != "transformer.wpe.weight")
    T, n = 50, 1000
    attention = 12 * c.n_layer * T * c.n_embd * n
    assert sft.flops_per_step(model, n, n, T) == 6 * N * n + attention
    assert sft.flops_per_step(model, n, 0, T) == 6 * (N - c.padded_vocab_size * c.n_embd) * n + attention  # no logits


TINY = dict(task="hh", device="cpu", n_layer=1, n_head=2, n_embd=32, block_size=64, max_prompt_len=32,
            pretrain_iters=10, pretrain_batch_size=4, pretrain_lr=1e-2, sft_iters=12, batch_size=8, lr=5e-3,
            eval_every=5, eval_batch_size=16, n_answers=2, max_new_tokens=8)


def args(**over):
    return [f"--{k}={v}" for k, v in {**TINY, **over}.items()]


@pytest.mark.slow
def test_tiny_end_to_end_from_scratch_then_resume(tmp_path, hh_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the data cache goes under tmp_path
    out = str(tmp_path / "out")
    report = sft.main(args(out_dir=out, data_dir=hh_dir))
    assert report["pretrain_loss_last"] < report["pretrain_loss_first"] - 1.0
    assert report["sft_loss_last"] < report["sft_loss_first"]
    assert report["test_loss_after"] < report["test_loss_before"] - 1.0
    assert report["test_ppl_after"] == pytest.approx(math.exp(report["test_loss_after"]))
    assert report["tokens_per_s"] > 0 and report["mfu"] is None  # CPU: peak unknown
    assert all(isinstance(a["greedy"], str) and isinstance(a["sampled"], str) for a in report["answers"])
    text = capsys.readouterr().out
    assert "peak unknown" in text and "greedy:" in text and "sampled:" in text
    rows = [json.loads(line) for line in open(os.path.join(out, "sft_log.jsonl"))]
    assert sum("pretrain_loss" in r for r in rows) == 10 and sum("sft_loss" in r for r in rows) == 12
    assert [r["step"] for r in rows if "test_loss" in r] == [0, 5, 10, 15, 20, 22]  # periodic + phase end + end
    assert any(isinstance(r.get("answer0_greedy"), str) for r in rows)
    assert os.path.getsize(os.path.join(out, "sft.png")) > 0
    ckpt = load_checkpoint(os.path.join(out, "sft.pt"))
    assert ckpt["step"] == 22 and ckpt["n_pretrain"] == 10 and ckpt["config"]["block_size"] == 64
    # resume: continues the SFT phase from step 22 up to n_pretrain + sft_iters = 10 + 15
    report2 = sft.main(args(out_dir=out, data_dir=hh_dir, resume=True, sft_iters=15, eval_every=0))
    rows = [json.loads(line) for line in open(os.path.join(out, "sft_log.jsonl"))]
    assert [r["step"] for r in rows if "sft_loss" in r] == list(range(10, 25))  # the first run's rows are kept
    assert report2["test_loss_before"] == report["test_loss_before"]  # before the first step, not at the resume
    assert load_checkpoint(os.path.join(out, "sft.pt"))["step"] == 25


def write_gpt2_folder(path, model):
    """model's weights in the Hugging Face GPT-2 layout (Conv1D weights transposed, 50257 token rows)."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight":
            continue  # tied to wte
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k] = (v[:50257] if k == "wte.weight" else v).contiguous().clone()
    os.makedirs(path)
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"n_head": model.config.n_head}, f)


def test_from_gpt2_weights_the_pretraining_phase_is_skipped(tmp_path, hh_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_gpt(3).eval()
    write_gpt2_folder(str(tmp_path / "gpt2"), model)
    out = str(tmp_path / "out")
    report = sft.main(args(out_dir=out, data_dir=hh_dir, init_from=str(tmp_path / "gpt2"), sft_iters=3,
                           eval_every=0, vocab_size=50257))  # GPT-2 weights need GPT-2's vocabulary
    test = data.load_hh_rlhf(hh_dir, block_size=64, max_prompt_len=32, cache_dir=None, verbose=False)["test"]
    assert report["test_loss_before"] == pytest.approx(sft.response_loss(model, test, RT, 16)[0], rel=1e-5)
    assert "pretrain_loss_first" not in report
    rows = [json.loads(line) for line in open(os.path.join(out, "sft_log.jsonl"))]
    assert not any("pretrain_loss" in r for r in rows) and sum("sft_loss" in r for r in rows) == 3
    assert load_checkpoint(os.path.join(out, "sft.pt"))["n_pretrain"] == 0


@pytest.mark.parametrize("V, rows", [(8192, 8192), (1000, 1024), (50257, 50304), (257, 320)])
def test_a_model_from_scratch_has_the_task_vocabulary(V, rows):
    """n_tokens = vocab_size real tokens (<|endoftext|> the last), the embedding padded up to a multiple of 64."""
    cfg = sft.config | dict(vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=64, seed=0)
    model, n_pretrain = sft.build_model(SimpleNamespace(**cfg))
    assert model.config.n_tokens == V and model.config.padded_vocab_size == rows and rows % 64 == 0 and rows - V < 64
    assert model.transformer.wte.weight.shape == (rows, 32) and model.eot_id == V - 1
    assert n_pretrain == cfg["pretrain_iters"]


def test_gpt2_weights_with_a_cut_vocabulary_are_a_user_error(tmp_path, hh_dir):
    cfg = SimpleNamespace(**(sft.config | dict(init_from="gpt2", vocab_size=8192, seed=0)))
    with pytest.raises(UserError, match="--init_from=gpt2.*--vocab_size=50257"):
        sft.build_model(cfg)


def test_resume_without_checkpoint_says_what_to_run(tmp_path, hh_dir):
    with pytest.raises(UserError, match=r"no .*sft\.pt to resume from"):
        sft.main(args(out_dir=str(tmp_path), data_dir=hh_dir, resume=True))


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, hh_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SFT_PY,
           *args(out_dir=str(out), data_dir=hh_dir, pretrain_iters=3, sft_iters=3, eval_every=0,
                 eval_examples=4, n_answers=1, grad_accum=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert load_checkpoint(str(out / "sft.pt"))["step"] == 6
    rows = [json.loads(line) for line in open(out / "sft_log.jsonl")]
    assert sum("sft_loss" in r for r in rows) == 3  # only the master logs
