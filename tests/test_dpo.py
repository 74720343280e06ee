"""dpo.py: each loss against its formula written out per element, the IPO optimum, the reference precompute
against a one-sequence-at-a-time forward, DPO recovering a known Bradley-Terry reward in a one-step
problem, and a tiny end-to-end run."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import data
import dpo
import evaluate
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from common import UserError
from model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


RT = SimpleNamespace(device="cpu", autocast=lambda: torch.autocast("cpu", enabled=False))


def four_logps(B=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]  # pc, pr, rc, rr


def by_hand(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    """The losses of dpo.dpo_loss's docstring, one pair at a time with math.log / math.exp."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = beta * ((a - c) - (b - d))
        log_sig = lambda z: -math.log(1 + math.exp(-z))  # log sigmoid(z) = log(1 / (1 + e^-z))
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * log_sig(h) - eps * log_sig(-h))
        elif loss_type == "ipo":
            out.append((h / beta - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.25), ("ipo", 0.0), ("hinge", 0.0)])
def test_losses_equal_their_formulas(loss_type, eps):
    pc, pr, rc, rr = four_logps()
    beta = 0.3
    losses, cr, rjr = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, by_hand(pc, pr, rc, rr, beta, loss_type, eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, torch.tensor([beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())],
                                                dtype=torch.float64))
    torch.testing.assert_close(rjr, torch.tensor([beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist())],
                                                 dtype=torch.float64))
    if loss_type == "hinge":  # the data must reach both sides of the hinge for this to test anything
        assert (losses == 0).any() and (losses > 0).any()


def test_label_smoothing_zero_is_sigmoid_and_rewards_are_detached():
    pc, pr, rc, rr = four_logps()
    pc.requires_grad_(True)
    a = dpo.dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0)
    b = dpo.dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid")
    assert torch.equal(a[0], b[0]) and a[0].requires_grad
    assert not a[1].requires_grad and not a[2].requires_grad


def test_unknown_loss_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
        dpo.dpo_loss(*four_logps(), 0.1, "kto")


@pytest.mark.parametrize("loss_type, gap", [("sigmoid", 0.0), ("sigmoid", 5.0), ("ipo", 0.0), ("hinge", 0.0),
                                            ("hinge", 0.5)])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type, gap):
    """The gradient at h = gap (0: at init, pi = pi_ref; hinge 0.5: inside the margin h < 1): a descent
    step lowers the loss by raising the chosen logprob and lowering the rejected one."""
    beta = 0.1
    rc, rr = torch.tensor([-30.0, -12.0]), torch.tensor([-25.0, -40.0])
    pc = (rc + gap / beta).requires_grad_(True)
    pr = rr.clone().requires_grad_(True)
    dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent: chosen up, rejected down
    assert torch.allclose(pc.grad, -pr.grad)  # the loss depends on the difference only


def test_hinge_has_no_gradient_outside_the_margin():
    pc = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-10.0])
    dpo.dpo_loss(pc, torch.tensor([-30.0]), ref, ref, 0.1, "hinge")[0].sum().backward()
    assert pc.grad.item() == 0.0  # h = 0.1 * (9 + 20) = 2.9 > 1


def test_dpo_metrics_of_the_reference_itself_are_a_tie_and_log_2():
    """dpo_metrics (DPO's figures from logprobs, not a reward model's): the reference scored against itself has every
    implicit reward 0 (accuracy 1/2, margin 0, sigmoid loss log 2); its likelihood accuracy is its own preference."""
    pc, pr = torch.tensor([-5.0, -9.0, -3.0, -4.0]), torch.tensor([-6.0, -8.0, -3.0, -7.0])  # chosen likelier 2, tie 1
    cfg = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    m = dpo.dpo_metrics(pc, pr, pc, pr, cfg)
    assert m["accuracy"] == 0.5 and m["margin"] == 0.0 and m["loss"] == pytest.approx(math.log(2))
    assert m["likelihood_accuracy"] == pytest.approx(2.5 / 4)


def test_ipo_minimum_at_gap_one_over_two_beta():
    for beta in (0.1, 0.5, 2.0):
        gaps = torch.linspace(-10, 10, 20001, dtype=torch.float64)  # log-ratio gap (chosen - rejected), step 1e-3
        zero = torch.zeros_like(gaps)
        losses = dpo.dpo_loss(gaps, zero, zero, zero, beta, "ipo")[0]
        assert gaps[losses.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-3)
        g = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
        z = torch.zeros(1, dtype=torch.float64)
        dpo.dpo_loss(g, z, z, z, beta, "ipo")[0].sum().backward()
        assert abs(g.grad.item()) < 1e-12  # derivative 0 at the optimum


# ----------------------------------------------------------------------------- logprobs of real pairs
def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32, **kw))


def one_at_a_time(model, prompt, response, average):
    """log pi(response | prompt) from the full logits of this one sequence, no padding, no batch."""
    idx = torch.tensor([prompt + response])
    logp = F.log_softmax(model(idx)[0].double(), -1)  # (T, V): row t predicts token t + 1
    lps = [logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(response)]
    return sum(lps) / len(lps) if average else sum(lps)


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_equals_on_the_fly(hh_dir, average):
    pairs = data.load_hh_rlhf(hh_dir, block_size=128, max_prompt_len=64, cache_dir=None, verbose=False)["train"][:7]
    model = tiny_gpt().eval()
    chosen, rejected = dpo.precompute_logprobs(model, pairs, RT, batch_size=6, average=average)  # 3 pairs a batch
    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(one_at_a_time(model, p["prompt"], p["chosen"], average), abs=1e-4)
        assert rejected[i].item() == pytest.approx(one_at_a_time(model, p["prompt"], p["rejected"], average), abs=1e-4)
    ids = [5, 0, 3, 6]  # a training batch: another composition, other padding (and another pad id)
    c, r = dpo.pair_logprobs(model, data.collate_pairs([pairs[i] for i in ids], pad_id=777), average)
    torch.testing.assert_close(c, chosen[ids], atol=1e-5, rtol=1e-6)  # float32 sums of ~100 nats
    torch.testing.assert_close(r, rejected[ids], atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- a one-step problem
def test_dpo_recovers_the_bradley_terry_reward_ranking():
    """6 actions with a known reward r; preferences sampled from Bradley-Terry, P(a > b) = sigmoid(r_a - r_b);
    a tabular policy trained with the DPO loss against a random pi_ref. DPO's optimum has implicit reward
    beta * log(pi / pi_ref) = r + const (Rafailov et al. 2023, section 4), so it must rank the actions as r
    does and, with this much data, be close to r up to the constant."""
    g = torch.Generator().manual_seed(0)
    K, N, beta = 6, 6000, 0.5
    r_true = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.0, -0.4], dtype=torch.float64)
    a = torch.randint(K, (N,), generator=g)
    b = (a + torch.randint(1, K, (N,), generator=g)) % K  # b != a
    a_wins = torch.rand(N, generator=g, dtype=torch.float64) < torch.sigmoid(r_true[a] - r_true[b])
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)  # random pi_ref
    logits = ref_logp.clone().requires_grad_(True)  # pi = pi_ref at the start
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(300):
        logp = torch.log_softmax(logits, 0)
        loss = dpo.dpo_loss(logp[chosen], logp[rejected], ref_logp[chosen], ref_logp[rejected], beta)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    implicit = beta * (torch.log_softmax(logits.detach(), 0) - ref_logp)  # (K,)
    assert torch.equal(implicit.argsort(), r_true.argsort())
    centred = lambda x: x - x.mean()
    torch.testing.assert_close(centred(implicit), centred(r_true), atol=0.15, rtol=0)


# ----------------------------------------------------------------------------- end to end
def write_checkpoints(out_dir, rm=True):
    cfg = dict(block_size=128, max_prompt_len=64)
    save_checkpoint(os.path.join(out_dir, "sft.pt"), tiny_gpt(0), cfg, "sft")
    if rm:
        save_checkpoint(os.path.join(out_dir, "rm.pt"), tiny_gpt(1, scalar_head=True), cfg, "rm")


def tiny_args(out_dir, hh_dir, **over):
    args = dict(task="hh", out_dir=out_dir, data_dir=hh_dir, device="cpu", block_size=128, max_prompt_len=64,
                batch_size=4, max_iters=30, lr=3e-3, warmup_iters=3, eval_pairs=0, eval_every=10,
                eval_batch_size=8, log_every=1, eval_prompts=8, max_new_tokens=8, train_pairs=0,
                vocab_size=50257)  # the tiny checkpoints have GPT-2's vocabulary (GPTConfig's default)
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def test_missing_sft_checkpoint_and_bad_loss_type_are_clear_errors(tmp_path, hh_dir):
    with pytest.raises(UserError, match=r"sft\.pt.*python sft\.py"):
        dpo.main(tiny_args(str(tmp_path), hh_dir))
    with pytest.raises(UserError, match=r"--loss_type=kto.*sigmoid, ipo, hinge"):
        dpo.main(tiny_args(str(tmp_path), hh_dir, loss_type="kto"))


def test_a_checkpoint_of_another_vocabulary_is_refused(tmp_path, hh_dir):
    write_checkpoints(str(tmp_path))  # GPT-2's 50257 tokens
    with pytest.raises(UserError, match=r"sft\.pt.*50257 tokens.*--vocab_size=8192"):
        dpo.main(tiny_args(str(tmp_path), hh_dir, vocab_size=8192))


def test_tiny_end_to_end(tmp_path, hh_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the data cache goes under tmp_path
    out = str(tmp_path / "out")
    write_checkpoints(out)
    report = dpo.main(tiny_args(out, hh_dir))
    rows = [json.loads(line) for line in open(os.path.join(out, "dpo_log.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[0] == pytest.approx(math.log(2), abs=1e-3)  # pi = pi_ref: h = 0
    assert sum(losses[-5:]) / 5 < 0.6 * math.log(2)
    assert report["loss_last"] < report["loss_first"]
    assert report["test_accuracy"] > 0.5 and report["test_margin"] > 0
    assert any("test_accuracy" in r for r in rows[:-1])  # the periodic test evaluation ran
    for f in ("dpo.pt", "dpo.png", "frontier.png", "eval_sft.json", "eval_dpo.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert report["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    assert "win rate of DPO over SFT" in capsys.readouterr().out
    # the win rate, recomputed answer by answer: DPO's and SFT's answers to the same prompts with the same seed,
    # both scored by rm.pt; a win counts 1, a tie 1/2
    cfg = common.parse_config(dpo.config, tiny_args(out, hh_dir), verbose=False)
    rt = common.setup_runtime(cfg)
    load = lambda name, **kw: model_from_checkpoint(load_checkpoint(os.path.join(out, name)), **kw).eval()
    prompts = evaluate.eval_prompts(data.load_task(cfg, verbose=False).prompts_test, cfg)
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed)
    rm = load("rm.pt", scalar_head=True)
    a = evaluate.sample_and_score(load("dpo.pt"), None, rm, prompts, rt, **kw)["scores"].tolist()
    b = evaluate.sample_and_score(load("sft.pt"), None, rm, prompts, rt, **kw)["scores"].tolist()
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    assert report["win_rate"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
    # "before" is the SFT policy measured on the same test pairs: pi = pi_ref, so every implicit reward is 0 (a tie),
    # and its likelihood accuracy is how often it already gives the chosen answer the higher logprob, by hand
    test = common.subset(data.ranking_pairs(data.load_rankings(cfg, data.load_task(cfg, verbose=False))[1],
                                            cfg.pairs_of_ranking), cfg.eval_pairs, cfg.seed)
    sft_model = load("sft.pt")
    logp = lambda x, y: one_at_a_time(sft_model, x, y, False)
    prefers = [1.0 if logp(p["prompt"], p["chosen"]) > logp(p["prompt"], p["rejected"]) else 0.0 for p in test]
    assert report["test_likelihood_accuracy_before"] == pytest.approx(sum(prefers) / len(prefers), abs=1e-6)
    assert report["test_accuracy_before"] == 0.5 and report["test_margin_before"] == 0.0
    assert report["test_loss_before"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)


def test_ipo_run_without_reward_model_skips_the_sample_evaluation(tmp_path, hh_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_checkpoints(out, rm=False)
    report = dpo.main(tiny_args(out, hh_dir, max_iters=2, eval_every=0, train_pairs=16, eval_pairs=8,
                                loss_type="ipo", beta=0.1))
    first = json.loads(open(os.path.join(out, "dpo_log.jsonl")).readline())
    assert first["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)  # pi = pi_ref: h = 0, (0 - 5)^2
    # ipo uses per-token means: about log(1 / 50257) = -10.8 for a random GPT; a sum would be < -100
    assert first["logps_chosen"] == pytest.approx(-math.log(50257), abs=0.5)
    assert "python reward.py" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "dpo.pt")) and not os.path.exists(os.path.join(out, "eval_dpo.json"))
    assert "test_accuracy" in report and "win_rate" not in report


def test_every_point_of_the_chart_shares_one_evaluation_set(tmp_path, hh_dir, monkeypatch, capsys):
    """SFT and DPO answer the same first eval_prompts test prompts with the same seed; a point left by an
    evaluation on other settings is not drawn beside them (the chart says so)."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_checkpoints(out)
    stale = os.path.join(out, "eval_ppo.json")
    with open(stale, "w") as f:
        json.dump({"score": 123.0, "kl": 1.0, "length": 1.0, "eos_rate": 1.0, "eval": {"n_prompts": 467}}, f)
    report = dpo.main(tiny_args(out, hh_dir, max_iters=2, eval_every=0, train_pairs=16, eval_pairs=8,
                                eval_prompts=6, eval_seed=3))
    points = {s: json.load(open(os.path.join(out, f"eval_{s}.json"))) for s in ("sft", "dpo")}
    want = dict(n_prompts=6, seed=3, max_new_tokens=8, temperature=1.0)
    assert points["sft"]["eval"] == points["dpo"]["eval"] == want
    assert points["dpo"]["score"] == pytest.approx(report["dpo"]["score"])
    assert f"{stale} left out" in capsys.readouterr().out
