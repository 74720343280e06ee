"""ppo.py against independent definitions: the per-token reward by hand, the KL estimators on a categorical with
a known KL, GAE against the explicit double sum, whitening, the clipped losses against elementwise loops (and
where their gradient vanishes), the adaptive KL controller's closed form, a one-step bandit whose KL-regularised
optimum is known in closed form, and tiny end-to-end runs of main() (with and without checkpoints)."""
import json
import math
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

import common
import data
import ppo
from checkpoint import save_checkpoint
from model import GPT, GPTConfig

EOT = 50256

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def prefix_mask(lengths, T):
    """(B, T) float mask with the first lengths[b] entries of row b set to 1."""
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


# ----------------------------------------------------------------------------- rewards and KL
@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_per_token_rewards_by_hand(kind):
    g = torch.Generator().manual_seed(0)
    # three responses, with pads (id 7) after the EOS; row 1 is cut off without EOS; row 2 is one EOS token
    tokens = torch.tensor([[11, 12, EOT, 7, 7], [13, 14, 15, 16, 17], [EOT, 7, 7, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    logprobs = -torch.rand(3, 5, generator=g) * 3  # values in the pad positions too: they must not count
    ref_logprobs = -torch.rand(3, 5, generator=g) * 3
    scores, beta = torch.tensor([2.0, -1.0, 0.5]), 0.1
    rewards = ppo.per_token_rewards(scores, logprobs, ref_logprobs, mask, beta, kind)
    want = torch.zeros(3, 5)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            lp, ref = logprobs[b, t].item(), ref_logprobs[b, t].item()
            kl = lp - ref if kind == "k1" else math.exp(ref - lp) - 1 - (ref - lp)
            want[b, t] = -beta * kl
        want[b, n - 1] += scores[b]  # the last real token
    assert torch.allclose(rewards, want, atol=1e-6)
    assert torch.all(rewards[mask == 0] == 0)
    for b in (0, 2):  # the score sits on the EOS
        eos = (tokens[b] == EOT).nonzero()[0, 0]
        no_kl = ppo.per_token_rewards(scores, logprobs, ref_logprobs, mask, 0.0, kind)
        assert no_kl[b, eos] == scores[b] and no_kl[b].abs().sum() == abs(scores[b])


def test_kl_estimators_on_a_known_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, generator=g), 0)
    q = torch.softmax(torch.randn(10, generator=g), 0)
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x][None], q.log()[x][None]  # (1, N)
    for kind in ("k1", "k3"):
        est = ppo.kl_estimate(logp, logq, kind)
        stderr = est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - true_kl) < 4 * stderr + 1e-3, kind
    # k3 >= 0 per token: log ratios drawn from this test's own generator (the global RNG's state depends on which tests
    # ran before), in float64 (in float32, exp(x) - 1 - x rounds below 0 for |x| < ~3e-4: 17 of 20,000 draws did)
    k3 = ppo.kl_estimate(torch.randn(1000, generator=g, dtype=torch.float64) * 5,
                         torch.randn(1000, generator=g, dtype=torch.float64) * 5, "k3")
    assert torch.all(k3 >= 0) and torch.all(ppo.kl_estimate(logp.double(), logq.double(), "k3") >= 0)
    with pytest.raises(ValueError, match="k2"):
        ppo.kl_estimate(logp, logq, "k2")


# ----------------------------------------------------------------------------- GAE and whitening
def gae_double_sum(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_k = r_k + gamma V_{k+1} - V_k, V_L = 0, explicitly."""
    B, T = rewards.shape
    A = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        v = lambda k: values[b, k].item() if k < L else 0.0
        delta = [rewards[b, k].item() + gamma * v(k + 1) - v(k) for k in range(L)]
        for t in range(L):
            A[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return A


def test_gae_equals_the_double_sum():
    g = torch.Generator().manual_seed(1)
    lengths, T = [7, 3, 1, 5], 7
    mask = prefix_mask(lengths, T)
    rewards, values = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)  # garbage beyond the mask
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
        adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
        want = gae_double_sum(rewards, values, lengths, gamma, lam).float()
        assert torch.allclose(adv, want, atol=1e-5)
        assert torch.allclose(ret, (want + values) * mask, atol=1e-5)
    # lam = 0: A_t = delta_t
    adv, _ = ppo.compute_gae(rewards, values, mask, 0.9, 0.0)
    next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(4, 1)], 1)
    assert torch.allclose(adv, (rewards + 0.9 * next_v - values) * mask, atol=1e-6)
    # gamma = lam = 1: A_t = reward-to-go - V_t
    adv, ret = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.stack([(rewards * mask)[:, t:].sum(1) for t in range(T)], 1)
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)
    assert torch.allclose(ret, to_go * mask, atol=1e-5)


def test_whiten_uses_the_masked_entries_only():
    g = torch.Generator().manual_seed(2)
    mask = prefix_mask([6, 2, 4], 6)
    x = torch.randn(3, 6, generator=g) * 3 + 5
    sel = x[mask.bool()]
    w = ppo.whiten(x, mask)
    assert abs(w[mask.bool()].mean().item()) < 1e-5
    assert abs(w[mask.bool()].std(unbiased=False).item() - 1) < 1e-4
    assert torch.allclose(w[mask.bool()], (sel - sel.mean()) / sel.std(unbiased=False), atol=1e-4)
    x2 = x.clone()
    x2[mask == 0] = 1e6  # entries outside the mask change nothing
    assert torch.allclose(ppo.whiten(x2, mask)[mask.bool()], w[mask.bool()])


# ----------------------------------------------------------------------------- the clipped losses
def test_policy_loss_equals_the_textbook_min_form():
    g = torch.Generator().manual_seed(3)
    mask = prefix_mask([5, 2, 4], 5)
    old = -torch.rand(3, 5, generator=g) * 2
    logprobs = old + torch.randn(3, 5, generator=g) * 0.4  # many ratios outside [0.8, 1.2]
    adv = torch.randn(3, 5, generator=g)
    eps = 0.2
    loss, clipfrac = ppo.policy_loss(logprobs, old, adv, mask, eps)
    terms, n_clipped = [], 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                r, a = math.exp(logprobs[b, t] - old[b, t]), adv[b, t].item()
                surr1, surr2 = r * a, min(max(r, 1 - eps), 1 + eps) * a
                terms.append(min(surr1, surr2))
                n_clipped += surr2 < surr1
    assert abs(loss.item() + sum(terms) / len(terms)) < 1e-5
    assert abs(clipfrac.item() - n_clipped / len(terms)) < 1e-6 and 0 < n_clipped < len(terms)


def test_policy_loss_gradient_vanishes_on_the_clipped_side():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.1]])).requires_grad_()  # ratios
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, clipfrac = ppo.policy_loss(logprobs, old, adv, torch.ones(1, 4), 0.2)
    loss.backward()
    grad = logprobs.grad[0]
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: the clipped side wins, no gradient
    assert grad[0] == 0 and grad[2] == 0
    # ratio 1.5 with A < 0 (pessimistic unclipped side) and ratio 1.1 inside the range: d/dlogp = -A r / N
    assert torch.isclose(grad[1], torch.tensor(1.5 / 4)) and torch.isclose(grad[3], torch.tensor(-1.1 / 4))
    assert clipfrac.item() == 0.5


def test_value_loss_equals_the_textbook_max_form():
    g = torch.Generator().manual_seed(4)
    mask = prefix_mask([4, 1, 3], 4)
    old, ret = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    values = (old + torch.randn(3, 4, generator=g) * 0.5).requires_grad_()
    c = 0.2
    loss, clipfrac = ppo.value_loss(values, old, ret, mask, c)
    terms, n_clipped, active = [], 0, torch.zeros(3, 4)
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                v, vo, G = values[b, t].item(), old[b, t].item(), ret[b, t].item()
                vc = vo + min(max(v - vo, -c), c)
                terms.append(max((v - G) ** 2, (vc - G) ** 2))
                n_clipped += (vc - G) ** 2 > (v - G) ** 2
                active[b, t] = (vc - G) ** 2 > (v - G) ** 2
    assert abs(loss.item() - 0.5 * sum(terms) / len(terms)) < 1e-5
    assert abs(clipfrac.item() - n_clipped / len(terms)) < 1e-6 and 0 < n_clipped < len(terms)
    loss.backward()
    assert torch.all(values.grad[active.bool()] == 0)  # the clipped side carries no gradient
    free = (mask.bool() & ~active.bool())
    assert torch.allclose(values.grad[free], ((values - ret) / len(terms))[free].detach(), atol=1e-6)
    plain, frac = ppo.value_loss(values, old, ret, mask, None)  # clipping off
    assert abs(plain.item() - 0.5 * ((values - ret)[mask.bool()] ** 2).mean().item()) < 1e-5 and frac == 0


def test_value_loss_without_clipping_is_exactly_the_squared_error():
    """With clipping off the loss is exactly 0.5 (V - G)^2 and the clip fraction exactly 0, even where
    V_old + clamp(V - V_old, -inf, inf) is not V in floating point (here V_old = 1e8, V = 0.1)."""
    old = torch.tensor([[1e8, 1e8, -3e7]])
    values = torch.tensor([[0.1, 0.3, 0.7]])
    ret = torch.tensor([[0.1 + 1e-7, 0.2, 0.7]])
    mask = torch.ones(1, 3)
    assert not torch.equal(old + torch.clamp(values - old, -float("inf"), float("inf")), values)  # the trap
    loss, clipfrac = ppo.value_loss(values, old, ret, mask, None)
    assert loss.item() == (0.5 * ((values - ret) ** 2).mean()).item() and clipfrac.item() == 0.0


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.0, 256)
    assert math.isclose(ctl.value, 0.1 * (1 + (7 / 6 - 1) * 256 / 10000))
    ctl = ppo.AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(100.0, 500)  # far above target: error clipped at +0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 500 / 10000))
    ctl.update(0.0, 500)  # far below: -0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 0.05) * (1 - 0.2 * 0.05))


# ----------------------------------------------------------------------------- a bandit with a known optimum
def test_ppo_on_a_bandit_reaches_the_kl_regularised_optimum():
    """One-token episodes over 8 actions: max_pi E[r(a)] - beta KL(pi || pi_ref) has the closed-form optimum
    pi* ∝ pi_ref exp(r / beta) (e.g. Rafailov et al. 2023, eq. 4). PPO built from ppo.py's functions (per-token
    KL reward, GAE with a zero critic, whitening, the clipped loss) must approach it."""
    g = torch.Generator().manual_seed(5)
    V, beta, B = 8, 0.5, 256
    r = torch.rand(V, generator=g)
    ref_logp = torch.log_softmax(torch.randn(V, generator=g), 0)
    target = torch.log_softmax(ref_logp + r / beta, 0)  # log pi*
    logits = ref_logp.clone().requires_grad_()  # pi starts at pi_ref
    kl_to_opt = lambda: (lambda lp: (lp.exp() * (lp - target)).sum().item())(torch.log_softmax(logits, 0))
    start = kl_to_opt()
    opt = torch.optim.Adam([logits], lr=0.05)
    mask = torch.ones(B, 1)
    for _ in range(100):
        with torch.no_grad():
            old_logp = torch.log_softmax(logits, 0)
            a = torch.multinomial(old_logp.exp(), B, replacement=True, generator=g)  # (B,)
            rewards = ppo.per_token_rewards(r[a], old_logp[a][:, None], ref_logp[a][:, None], mask, beta, "k1")
            adv, _ = ppo.compute_gae(rewards, torch.zeros(B, 1), mask, 1.0, 0.95)
            adv = ppo.whiten(adv, mask)
        for _ in range(4):  # ppo epochs, full batch
            loss, _ = ppo.policy_loss(torch.log_softmax(logits, 0)[a][:, None], old_logp[a][:, None], adv, mask, 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert start > 0.05 and kl_to_opt() < 0.2 * start, (start, kl_to_opt())


# ----------------------------------------------------------------------------- critic-free estimators
def test_rloo_advantages_equal_a_leave_one_out_loop():
    g = torch.Generator().manual_seed(6)
    k, groups = 4, 5
    rewards = torch.randn(k * groups, generator=g)
    adv = ppo.rloo_advantages(rewards, k)
    want = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        group = range(i // k * k, i // k * k + k)
        others = [rewards[j].item() for j in group if j != i]
        want[i] = rewards[i] - sum(others) / len(others)
    torch.testing.assert_close(adv, want)
    assert torch.allclose(adv.view(groups, k).sum(1), torch.zeros(groups), atol=1e-6)  # each group sums to 0
    with pytest.raises(ValueError):
        ppo.rloo_advantages(rewards, 3)  # 20 rewards are not groups of 3


def test_grpo_advantages_equal_a_loop_with_the_sample_std():
    g = torch.Generator().manual_seed(7)
    k, groups, eps = 3, 4, 1e-4
    scores = torch.randn(k * groups, generator=g)
    scores[6:9] = 0.5  # a group of equal scores
    adv = ppo.grpo_advantages(scores, k, eps)
    for grp in range(groups):
        s = [scores[grp * k + j].item() for j in range(k)]
        mean = sum(s) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (k - 1))  # sample std, n - 1
        for j in range(k):
            assert adv[grp * k + j].item() == pytest.approx((s[j] - mean) / (std + eps), abs=1e-5)
    assert torch.all(adv[6:9] == 0) and torch.isfinite(adv).all()


def test_grpo_loss_equals_the_formula_token_by_token():
    """DeepSeekMath eq. 3 on a hand-built batch: per sequence, the mean over its tokens of
    -min(rho A, clip(rho) A) + beta * (pi_ref / pi - log(pi_ref / pi) - 1); then the mean over sequences."""
    g = torch.Generator().manual_seed(8)
    mask = prefix_mask([3, 1, 4], 4)
    logp = (-torch.rand(3, 4, generator=g) * 2).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g) * 0.3
    ref = logp.detach() + torch.randn(3, 4, generator=g) * 0.5
    adv = torch.tensor([[1.5], [-0.7], [0.2]]) * mask  # one advantage per sequence
    eps, beta = 0.2, 0.1
    loss, clipfrac = ppo.grpo_loss(logp, old, ref, adv, mask, eps, beta)
    per_seq, n_clipped, n = [], 0, 0
    for b in range(3):
        terms = []
        for t in range(int(mask[b].sum())):
            rho = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            q = math.exp(ref[b, t].item() - logp[b, t].item())  # pi_ref / pi
            terms.append(-min(unclipped, clipped) + beta * (q - math.log(q) - 1))
            n_clipped, n = n_clipped + (clipped < unclipped), n + 1
        per_seq.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_seq) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(n_clipped / n)


@pytest.mark.parametrize("estimator, beta", [("rloo", 0.5), ("grpo", 0.02), ("reinforce_baseline", 0.5)])
def test_critic_free_estimators_move_a_bandit_toward_the_optimum(estimator, beta):
    """The bandit of the PPO test, k = 8 samples per prompt, no critic. rloo optimises the same KL-regularised
    objective as PPO (R = r - beta kl, leave-one-out baseline), so it must approach pi* ∝ pi_ref exp(r / beta), and
    so must REINFORCE with the batch-mean baseline (with the unclipped importance-sampled loss, cpi_loss).
    grpo's advantages are rescaled by the group's std, and its k3 loss term pulls with the gradient of
    KL(pi_ref || pi), so its fixed point is not that pi*; with a small beta both approach the best arm, and it
    must move there."""
    g = torch.Generator().manual_seed(5)
    V, k, groups = 8, 8, 32
    r = torch.rand(V, generator=g)
    ref_logp = torch.log_softmax(torch.randn(V, generator=g), 0)
    target = torch.log_softmax(ref_logp + r / beta, 0)  # log pi*
    logits = ref_logp.clone().requires_grad_()
    kl_to_opt = lambda: (lambda lp: (lp.exp() * (lp - target)).sum().item())(torch.log_softmax(logits, 0))
    start = kl_to_opt()
    opt = torch.optim.Adam([logits], lr=0.05)
    mask = torch.ones(k * groups, 1)
    for _ in range(100):
        with torch.no_grad():
            old_logp = torch.log_softmax(logits, 0)
            a = torch.multinomial(old_logp.exp(), k * groups, replacement=True, generator=g)  # groups of k
            rewards = ppo.per_token_rewards(r[a], old_logp[a][:, None], ref_logp[a][:, None], mask, beta, "k1")
            adv = ppo.critic_free_advantages(r[a], rewards, mask, estimator, k, 1.0)
        for _ in range(4):
            logp = torch.log_softmax(logits, 0)[a][:, None]
            if estimator == "grpo":
                loss, _ = ppo.grpo_loss(logp, old_logp[a][:, None], ref_logp[a][:, None], adv, mask, 0.2, beta)
            elif estimator == "reinforce_baseline":
                loss, _ = ppo.cpi_loss(logp, old_logp[a][:, None], adv, mask, 0.2)
            else:
                loss, _ = ppo.policy_loss(logp, old_logp[a][:, None], adv, mask, 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert start > 0.05 and kl_to_opt() < 0.5 * start, (start, kl_to_opt())


# ----------------------------------------------------------------------------- end to end
def write_tiny_checkpoints(out_dir, seed=0):
    """A tiny random SFT model whose answers use mostly 16 tokens (their embedding rows scaled up, so they dominate
    the tied output layer), and a reward model whose score is a known function of the response's last token:
    its trunk is the SFT model's with the positions and the blocks' outputs zeroed, so the final hidden state is
    LayerNorm(wte[last token]) and the score a random linear function of it (of order 1 among the 16 tokens).
    PPO has to learn which of the 16 tokens to end on."""
    torch.manual_seed(seed)
    settings = dict(block_size=128, max_prompt_len=64)
    vocab = dict(n_tokens=8192, padded_vocab_size=8192)  # common.SHARED's default vocabulary: <|endoftext|> is 8191
    sft = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, **vocab))
    with torch.no_grad():
        sft.transformer.wte.weight[1000:1016] *= 50
    rm = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, scalar_head=True, **vocab))
    rm.load_state_dict(sft.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "wpe" in name or "c_proj" in name:
                p.zero_()
        torch.nn.init.normal_(rm.scalar_head.weight, std=0.3)
    save_checkpoint(os.path.join(out_dir, "sft.pt"), sft, settings, "sft")
    save_checkpoint(os.path.join(out_dir, "rm.pt"), rm, settings, "rm")


TINY = ["--task=hh", "--device=cpu", "--dtype=float32", "--block_size=128", "--max_prompt_len=64", "--max_new_tokens=12",
        "--batch_size=16", "--minibatch_size=8", "--ppo_epochs=2", "--ptx_batch_size=2", "--ptx_block_size=32",
        "--eval_prompts=32", "--eval_batch_size=32", "--sample_every=100"]


@pytest.mark.slow
def test_tiny_ppo_run_raises_the_score(hh_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data cache goes to tmp_path/data/cache
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    report = ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=15", "--lr=1e-3",
                              "--critic_lr=1e-3", "--beta=0.01"])
    for f in ("ppo.pt", "ppo_log.jsonl", "ppo.png", "eval_sft.json", "eval_ppo.json", "frontier.png"):
        assert os.path.exists(os.path.join(out, f)), f
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert len(rows) == 15 and {"score", "kl", "beta", "entropy", "approx_kl", "explained_var"} <= set(rows[0])
    scores = [row["score"] for row in rows]
    assert sum(scores[-4:]) / 4 > scores[0] + 1.0, scores  # the first rollout is the SFT policy's
    assert report["ppo"]["score"] > report["sft"]["score"] + 0.5 and report["win_rate"] > 0.7, report
    assert report["ppo"]["kl"] > report["sft"]["kl"]  # moved away from the reference (whose KL to itself is 0)


def test_missing_checkpoints_run_the_earlier_stages(hh_dir, tmp_path, monkeypatch):
    """With no sft.pt / rm.pt, main() runs sft.main and reward.main (stand-ins here) with the shared settings."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    calls = []
    shared = dict(task="", out_dir="", data_dir="", device="", dtype="", seed=0, vocab_size=0, block_size=0,
                  max_prompt_len=0)

    def fake(name):
        def main(argv):
            calls.append((name, sorted(argv)))
            if name == "reward":  # reward.py runs after sft.py: both files are there by now
                assert os.path.exists(os.path.join(out, "sft.pt"))
                write_tiny_checkpoints(out)
            else:
                write_tiny_checkpoints(out)
                os.remove(os.path.join(out, "rm.pt"))
            return {}
        return types.SimpleNamespace(main=main, config=dict(shared, lr=0.0))

    monkeypatch.setitem(sys.modules, "sft", fake("sft"))
    monkeypatch.setitem(sys.modules, "reward", fake("reward"))
    ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=1", "--seed=7", "--eval_prompts=4"])
    want = sorted(["--task=hh", f"--out_dir={out}", f"--data_dir={hh_dir}", "--device=cpu", "--dtype=float32", "--seed=7",
                   "--vocab_size=8192", "--block_size=128", "--max_prompt_len=64"])
    assert calls == [("sft", want), ("reward", want)]
    assert os.path.exists(os.path.join(out, "ppo.pt"))


def test_every_flag_switched_at_once(hh_dir, tmp_path, monkeypatch):
    """The flags flipped from their defaults in one tiny run: each shows where it should."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    batches, real_rollout = [], ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a, **k: batches.append(real_rollout(*a, **k)) or batches[-1])
    ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=3", "--eval_prompts=4",
                     "--whiten_advantages=False", "--clip_value_loss=False", "--ptx_coef=0.5", "--kl_estimator=k3",
                     "--adaptive_kl=True", "--target_kl=100", "--kl_horizon=16", "--missing_eos_penalty=1",
                     "--grad_clip=0", "--decay_lr=False", "--beta=0.1", "--normalize_scores=False",
                     "--sample_every=0"])
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert ["sample_0" in r for r in rows] == [False, False, True]  # sample_every=0: only the last iteration
    assert all(r["ptx_loss"] > 0 and r["value_clipfrac"] == 0 and r["lr"] == rows[0]["lr"] for r in rows)
    # KL far below target: beta shrinks by the clipped factor (1 - 0.2 * 16 / 16) each iteration
    assert [round(r["beta"], 6) for r in rows] == [0.1, 0.08, 0.064]
    # the logged KL is k3's, by hand from each rollout's logprobs (k1's, the default, is another number once the
    # policy has moved: at the first rollout pi = pi_ref and both are 0)
    for r, b in zip(rows, batches):
        log_ratio = b.ref_logprobs - b.old_logprobs  # log(pi_ref / pi)
        k3 = ((log_ratio.exp() - 1 - log_ratio) * b.response_mask).sum(1).mean().item()
        k1 = (-log_ratio * b.response_mask).sum(1).mean().item()
        assert r["kl"] == pytest.approx(k3, rel=1e-5, abs=1e-7) and (r is rows[0] or abs(k3 - k1) > 1e-3 * k3)
    assert rows[0]["kl"] == 0 < rows[1]["kl"]
    # no EOS in these tiny answers: every response is penalised, objective = score - 1 - beta * kl
    assert all(r["eos_rate"] == 0 for r in rows)
    assert all(abs(r["objective"] - (r["score"] - 1 - r["beta"] * r["kl"])) < 1e-4 for r in rows)


def test_ptx_runs_with_its_batch_shape_and_changes_the_update(hh_dir, tmp_path, monkeypatch):
    """PPO-ptx end to end: with --ptx_coef > 0 every minibatch step draws ptx_batch_size windows of ptx_block_size
    tokens, the logged ptx loss is finite and nonzero, and the loss reaches the update: one iteration (the same
    rollout, the same text windows) with ptx_coef 0.5 and 2 ends with other weights."""
    monkeypatch.chdir(tmp_path)
    shapes, real_sample = [], data.sample_text_batch

    def sample(stream, batch_size, block_size, generator):
        tb = real_sample(stream, batch_size, block_size, generator)
        shapes.append(tuple(tb["idx"].shape))
        return tb
    monkeypatch.setattr(data, "sample_text_batch", sample)
    weights, rows = {}, {}
    for coef in (0.5, 2.0):
        out = str(tmp_path / f"out{coef}")
        write_tiny_checkpoints(out)
        shapes.clear()
        ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=1", "--eval_prompts=4",
                         f"--ptx_coef={coef}", "--ptx_batch_size=3", "--ptx_block_size=20"])
        assert shapes == [(3, 20)] * 4  # 2 epochs x 2 minibatches of 8 of the 16 sequences
        rows[coef] = json.loads(open(os.path.join(out, "ppo_log.jsonl")).readline())
        assert math.isfinite(rows[coef]["ptx_loss"]) and rows[coef]["ptx_loss"] > 0
        weights[coef] = torch.load(os.path.join(out, "ppo.pt"))["model"]
    assert rows[2.0]["ptx_loss"] > 2 * rows[0.5]["ptx_loss"]  # about 4x: the same windows, the same start
    assert rows[2.0]["score"] == rows[0.5]["score"]  # the same rollout: the runs differ in the update only
    assert any(not torch.equal(weights[0.5][k], weights[2.0][k]) for k in weights[0.5])


@pytest.mark.parametrize("V", [50257, 8192])  # GPT-2's vocabulary (EOT 50256) and the default cut one (EOT 8191)
def test_rollout_tensors_are_aligned_with_a_slow_per_sequence_computation(V):
    """rollout()'s [:, P:] logprob slice and [:, P - 1:-1] value slice, checked one sequence at a time without
    padding: log pi(y_t | x, y_<t) from full logits, V_t = the critic at the token before y_t, the score at the
    last real token (the EOS, the vocabulary's last id V - 1, if there is one)."""
    torch.manual_seed(0)
    eot, vocab = V - 1, dict(n_tokens=V, padded_vocab_size=64 * math.ceil(V / 64))
    policy, reference = (GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, **vocab)).eval()
                         for _ in range(2))
    critic, rm = (GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, scalar_head=True, **vocab)).eval()
                  for _ in range(2))
    with torch.no_grad():  # make EOS likely, so that some responses stop early and others are cut off
        policy.transformer.wte.weight[eot] *= 40
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14, 15], [20, 21]]
    batch_in = data.collate_prompts([{"prompt": p} for p in prompts])
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    temp = 0.7
    batch = ppo.rollout(policy, reference, critic, rm, batch_in, rt, 10, temp, torch.Generator().manual_seed(1))
    lengths = batch.response_mask.sum(1).long().tolist()
    assert len(set(lengths)) > 1 and batch.has_eos.sum() > 0  # a mix: padding after the EOS matters
    R = batch.response_mask.shape[1]
    for b, prompt in enumerate(prompts):
        n = lengths[b]
        response = batch.idx[b, batch.P:batch.P + n].tolist()
        seq = torch.tensor([prompt + response])  # (1, L) no padding at all
        with torch.no_grad():
            logp = torch.log_softmax(policy(seq)[0] / temp, -1)  # (L, V)
            ref = torch.log_softmax(reference(seq)[0] / temp, -1)
            values = critic.scalar(seq)[0]  # (L,)
            score = rm.scalar(seq)[0, -1]
        for t, token in enumerate(response):
            pos = len(prompt) + t  # the position of y_t; it is predicted from position pos - 1
            assert batch.old_logprobs[b, t].item() == pytest.approx(logp[pos - 1, token].item(), abs=1e-4)
            assert batch.ref_logprobs[b, t].item() == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
            assert batch.old_values[b, t].item() == pytest.approx(values[pos - 1].item(), abs=1e-4)
        assert batch.scores[b].item() == pytest.approx(score.item(), abs=1e-4)
        assert batch.has_eos[b].item() == float(response[-1] == eot)
        assert all(t < V for t in response) and eot not in response[:-1]  # nothing after the EOS is kept
        assert torch.all(batch.old_logprobs[b, n:] == 0) and torch.all(batch.old_values[b, n:] == 0) and n <= R


def test_the_critic_starts_in_the_units_of_its_targets(hh_dir, tmp_path, monkeypatch):
    """Returns are built from s / score_scale, so the critic (a copy of the reward model) starts with its head
    divided by score_scale: with critic_lr=0 the saved critic is exactly that."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=1", "--eval_prompts=4",
                     "--critic_lr=0"])
    ckpt, rm = torch.load(os.path.join(out, "ppo.pt")), torch.load(os.path.join(out, "rm.pt"))["model"]
    scale = ckpt["score_scale"]
    assert 0 < scale != 1.0
    for k in ("scalar_head.weight", "scalar_head.bias"):
        torch.testing.assert_close(ckpt["critic"][k], rm[k] / scale)
    assert torch.equal(ckpt["critic"]["transformer.h.0.attn.c_attn.weight"], rm["transformer.h.0.attn.c_attn.weight"])


def test_score_scale_falls_back_to_one_when_every_score_is_alike(capsys):
    """Scores all alike (one answer, or a reward model that cannot tell them apart): their std is 0, and dividing by
    it would make every reward inf or nan; the scale is 1 instead, with a warning. Otherwise the scale is the sample
    std, by hand; with normalize_scores off it is 1."""
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    cfg = types.SimpleNamespace(normalize_scores=True)
    for scores in (torch.full((7,), 3.3), torch.full((1,), -0.4), torch.zeros(4)):
        assert ppo.score_scale(scores, cfg, rt) == 1.0
    assert "not normalising them (scale 1)" in capsys.readouterr().out
    scores = torch.tensor([1.0, 2.0, 4.0, 7.0])  # mean 3.5, squares about it 6.25 + 2.25 + 0.25 + 12.25 = 21
    assert ppo.score_scale(scores, cfg, rt) == pytest.approx(math.sqrt(21 / 3))
    assert ppo.score_scale(scores, types.SimpleNamespace(normalize_scores=False), rt) == 1.0


def test_rescale_critic_divides_its_head_and_nothing_else():
    """The critic's values in the rewards' units: its head's weight and bias divided by the scale, so every value it
    gives is divided by it (to float rounding); the trunk is left as it is."""
    torch.manual_seed(0)
    critic = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, scalar_head=True)).eval()
    torch.nn.init.normal_(critic.scalar_head.bias)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    idx = torch.randint(0, 100, (2, 6))
    values = critic.scalar(idx)
    ppo.rescale_critic(critic, 4.0)
    after = critic.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v / 4.0 if k.startswith("scalar_head.") else v), k
    torch.testing.assert_close(critic.scalar(idx), values / 4.0)


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_tiny_critic_free_run_builds_no_critic(estimator, hh_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=2", "--eval_prompts=4",
                     f"--advantage_estimator={estimator}", "--samples_per_prompt=4", "--batch_size=4"])
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert len(rows) == 2 and all("policy_loss" in r and "score" in r for r in rows)
    assert not any(k in r for r in rows for k in ("value_loss", "value_clipfrac", "explained_var"))
    ckpt = torch.load(os.path.join(out, "ppo.pt"))
    assert "critic" not in ckpt and set(ckpt["optimizers"]) == {"policy"}
    for f in ("ppo.png", "eval_ppo.json", "frontier.png"):
        assert os.path.exists(os.path.join(out, f))


def test_critic_free_estimators_need_two_samples_per_prompt(tmp_path):
    with pytest.raises(common.ConfigError, match="samples_per_prompt >= 2"):
        ppo.main(["--device=cpu", f"--out_dir={tmp_path}", "--advantage_estimator=grpo"])
    with pytest.raises(common.ConfigError, match="--advantage_estimator=a2c: expected one of gae, reinforce, "):
        ppo.main(["--device=cpu", f"--out_dir={tmp_path}", "--advantage_estimator=a2c"])


def test_bad_kl_estimator_is_a_clear_error(tmp_path):
    with pytest.raises(common.ConfigError, match="--kl_estimator=k2: expected one of k1, k3"):
        ppo.main(["--device=cpu", f"--out_dir={tmp_path}", "--kl_estimator=k2"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes(hh_dir, tmp_path):
    """Each rank rolls out its own prompts and the gradients are averaged; the run must finish (no rank waits on
    a collective the other never calls) and the master must write the checkpoint and the report files."""
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    with socket.socket() as s:  # a free port, so that parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(os.path.dirname(ppo.__file__), "ppo.py"), *TINY, f"--data_dir={hh_dir}", f"--out_dir={out}",
           "--iterations=2", "--batch_size=4", "--minibatch_size=2", "--eval_prompts=4", "--sample_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1] and "sample_0" in rows[0]
    assert os.path.exists(os.path.join(out, "ppo.pt")) and "win rate of PPO over SFT" in res.stdout


def test_the_critic_is_scaled_by_its_own_scores_when_the_reward_is_the_judge(monkeypatch):
    """--reward=gold: the rewards are the judge's, the critic a copy of the reward model. In the first iteration the
    rewards are divided by the std of the judge's scores, the critic's head and its values by the std of the reward
    model's own scores, so that both start in normalised units (by hand: stds sqrt(21 / 3) and sqrt(20 / 3))."""
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    torch.manual_seed(0)
    critic = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, scalar_head=True))
    weight = critic.scalar_head.weight.detach().clone()
    gold = torch.tensor([1.0, 2.0, 4.0, 7.0])  # std sqrt(21 / 3)
    proxy = torch.tensor([0.0, 2.0, 4.0, 6.0])  # mean 3, squares 9 + 1 + 1 + 9 = 20: std sqrt(20 / 3)
    values, mask = torch.randn(4, 5), torch.ones(4, 5)
    batch = types.SimpleNamespace(scores=proxy, old_values=values.clone(), has_eos=torch.ones(4), response_mask=mask,
                                  old_logprobs=torch.zeros(4, 5), ref_logprobs=torch.zeros(4, 5), idx=torch.zeros(4, 7),
                                  entropy=torch.zeros(4, 5))
    seen = {}
    monkeypatch.setattr(ppo, "rollout", lambda *a, **k: batch)
    monkeypatch.setattr(ppo, "responses", lambda b: [[1]] * 4)
    monkeypatch.setattr(ppo.data, "gold_scores", lambda *a: gold)
    monkeypatch.setattr(ppo.data, "collate_prompts", lambda examples: None)

    def update(run, batch, advantages, returns, old_values, *rest):
        seen.update(returns=returns, old_values=old_values)
        return {}
    monkeypatch.setattr(ppo, "update", update)
    cfg = common.parse_config(ppo.config, ["--device=cpu", "--reward=gold", "--batch_size=4", "--lam=1"], verbose=False)
    run = types.SimpleNamespace(policy=None, reference=None, critic=critic, reward_model=None, logprobs=None,
                                opt_policy=torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                                opt_critic=torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                                gen=torch.Generator().manual_seed(0), sampler=None, score_scale=None, kl_ctl=None)
    task = types.SimpleNamespace(prompts_train=[dict(prompt=[1])] * 8, judge=object(), text=None)
    ppo.iteration(run, 0, 0.0, cfg, rt, task)
    assert run.score_scale == pytest.approx(math.sqrt(21 / 3))
    torch.testing.assert_close(seen["old_values"], values / math.sqrt(20 / 3))
    torch.testing.assert_close(critic.scalar_head.weight.detach(), weight / math.sqrt(20 / 3))
    # beta 0, gamma = lam = 1: the return of every token is the judge's score over its std, put on the last token
    torch.testing.assert_close(seen["returns"][:, 0], gold / math.sqrt(21 / 3))


def test_penalised_scores_of_a_batch_with_and_without_eos():
    """A batch mixing answers that end in EOS and answers cut off: only the cut ones lose the penalty, after the
    normalisation (by hand), and per_token_rewards puts each on its own last token."""
    scores, has_eos = torch.tensor([2.0, -1.0, 0.5, 4.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = ppo.penalised_scores(scores, has_eos, 2.0, 0.75)
    torch.testing.assert_close(got, torch.tensor([1.0, -0.5 - 0.75, 0.25 - 0.75, 2.0]))
    assert torch.equal(ppo.penalised_scores(scores, has_eos, 1.0, 0.0), scores)  # no penalty: the scores themselves
    mask = prefix_mask([2, 4, 4, 1], 4)
    zeros = torch.zeros(4, 4)
    rewards = ppo.per_token_rewards(got, zeros, zeros, mask, 0.1)
    for b, last in enumerate([1, 3, 3, 0]):
        assert rewards[b, last].item() == pytest.approx(got[b].item()) and rewards[b].sum().item() == pytest.approx(
            got[b].item())


def test_ptx_loss_by_hand():
    """ptx_loss = - ptx_coef * mean over the target_mask tokens of log pi(x_t | x_<t), computed here from the full
    logits one token at a time; its gradient reaches the policy."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, n_tokens=100, padded_vocab_size=128))
    stream = torch.randint(0, 100, (200,))
    tb = data.sample_text_batch(stream, 3, 10, torch.Generator().manual_seed(1))
    loss = ppo.ptx_loss(policy, tb, 0.5)
    logits = policy(tb["idx"], tb["attention_mask"])  # (3, 10, V)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(1, 10):  # token 0 has no context (its target_mask is 0)
            if tb["target_mask"][b, t]:
                total += torch.log_softmax(logits[b, t - 1], -1)[tb["idx"][b, t]].item()
                count += 1
    assert count == 27 and loss.item() == pytest.approx(-0.5 * total / count, rel=1e-5)
    loss.backward()
    assert policy.transformer.wte.weight.grad.abs().sum() > 0


def test_rollout_takes_pi_old_from_the_updates_function():
    """With a compiled logprob function for the update, the rollout records log pi_old with that same function (so
    the first ratio of an update is exactly 1): a stand-in that shifts every logprob by 1 shows where they came from."""
    torch.manual_seed(0)
    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, n_tokens=100, padded_vocab_size=128)
    policy, reference = GPT(GPTConfig(**cfg)).eval(), GPT(GPTConfig(**cfg)).eval()
    rm = GPT(GPTConfig(**cfg, scalar_head=True)).eval()
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    prompts = data.collate_prompts([dict(prompt=[5, 6, 7]), dict(prompt=[8])])
    def shifted(idx, attn, target_mask, temperature, return_entropy=False):
        lp, entropy = policy.logprobs(idx, attn, target_mask, temperature, return_entropy=True)
        return (lp + target_mask, entropy) if return_entropy else lp + target_mask
    a = ppo.rollout(policy, reference, None, rm, prompts, rt, 6, 1.0, torch.Generator().manual_seed(0))
    b = ppo.rollout(policy, reference, None, rm, prompts, rt, 6, 1.0, torch.Generator().manual_seed(0), shifted)
    assert torch.equal(a.idx, b.idx)
    torch.testing.assert_close(b.old_logprobs, a.old_logprobs + a.response_mask)


def test_flags_whiten_off_and_grad_clip_0_really_switch_off(hh_dir, tmp_path, monkeypatch):
    """--whiten_advantages=False never calls whiten; --grad_clip=0 never scales a gradient (every clip_grad_norm_
    call gets max_norm = inf); with the defaults both are used."""
    monkeypatch.chdir(tmp_path)
    calls = {"whiten": 0, "max_norms": []}
    real_whiten, real_clip = ppo.whiten, torch.nn.utils.clip_grad_norm_

    def whiten(x, mask):
        calls["whiten"] += 1
        return real_whiten(x, mask)

    def clip(params, max_norm, *a, **k):
        calls["max_norms"].append(max_norm)
        return real_clip(params, max_norm, *a, **k)
    monkeypatch.setattr(ppo, "whiten", whiten)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for flags, whitened, finite in ((["--whiten_advantages=False", "--grad_clip=0"], False, False), ([], True, True)):
        out = str(tmp_path / f"out{len(flags)}")
        write_tiny_checkpoints(out)
        calls.update(whiten=0, max_norms=[])
        ppo.main(TINY + [f"--data_dir={hh_dir}", f"--out_dir={out}", "--iterations=2", "--eval_prompts=4",
                         "--batch_size=8"] + flags)
        assert (calls["whiten"] == 2) == whitened and calls["max_norms"]
        assert all(math.isfinite(m) for m in calls["max_norms"]) == finite
        assert all(m == float("inf") for m in calls["max_norms"]) == (not finite)


# ----------------------------------------------------------------------------- the ladder's rungs
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_advantages_equal_loops_over_the_returns(gamma):
    """Rungs 1-3 against the textbook sums: R = sum_t r_t; A = R, R - mean_b R, or G_t - mean_b R with the
    reward-to-go G_t = sum_{t' >= t} gamma^(t' - t) r_t' over the real tokens."""
    g = torch.Generator().manual_seed(11)
    lengths, T = [5, 2, 4], 5
    mask = prefix_mask(lengths, T)
    rewards = torch.randn(3, T, generator=g) * mask
    R = [sum(rewards[b, t].item() for t in range(lengths[b])) for b in range(3)]
    b_mean = sum(R) / 3
    for estimator in ("reinforce", "reinforce_baseline", "reward_to_go"):
        adv = ppo.reinforce_advantages(rewards, mask, estimator, gamma)
        for b in range(3):
            for t in range(T):
                if t >= lengths[b]:
                    want = 0.0
                elif estimator == "reinforce":
                    want = R[b]
                elif estimator == "reinforce_baseline":
                    want = R[b] - b_mean
                else:
                    want = sum(gamma ** (u - t) * rewards[b, u].item() for u in range(t, lengths[b])) - b_mean
                assert adv[b, t].item() == pytest.approx(want, abs=1e-5), (estimator, b, t)
    with pytest.raises(ValueError, match="estimator 'gae'"):
        ppo.reinforce_advantages(rewards, mask, "gae", gamma)


def test_cpi_and_klpen_losses_equal_their_formulas_token_by_token():
    """cpi: - mean rho A; klpen: that + beta * mean((rho - 1) - log rho); at rho = 1 both have the policy gradient
    - A / N per token (the penalty's gradient is 0 there)."""
    g = torch.Generator().manual_seed(4)
    mask = prefix_mask([4, 2], 4)
    old = -torch.rand(2, 4, generator=g) * 2
    logprobs = old + torch.randn(2, 4, generator=g) * 0.5
    adv = torch.randn(2, 4, generator=g)
    terms, kls = [], []
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                rho = math.exp(logprobs[b, t] - old[b, t])
                terms.append(rho * adv[b, t].item())
                kls.append(rho - 1 - math.log(rho))
    cpi, _ = ppo.cpi_loss(logprobs, old, adv, mask, 0.2)
    klpen, _ = ppo.klpen_loss(logprobs, old, adv, mask, 0.2, 3.0)
    assert cpi.item() == pytest.approx(-sum(terms) / len(terms), abs=1e-5)
    assert klpen.item() == pytest.approx(-sum(terms) / len(terms) + 3.0 * sum(kls) / len(kls), abs=1e-5)
    for loss_fn in (lambda lp: ppo.cpi_loss(lp, old, adv, mask, 0.2),
                    lambda lp: ppo.klpen_loss(lp, old, adv, mask, 0.2, 3.0)):
        lp = old.clone().requires_grad_()
        loss_fn(lp)[0].backward()
        assert torch.allclose(lp.grad, -adv * mask / mask.sum(), atol=1e-6)


def test_klpen_beta_halves_and_doubles_around_the_target():
    """PPO paper, section 4: d < d_targ / 1.5 halves beta, d > d_targ * 1.5 doubles it, between leaves it."""
    assert ppo.klpen_beta_update(1.0, 0.006, 0.01) == 0.5  # 0.006 < 0.00667
    assert ppo.klpen_beta_update(1.0, 0.007, 0.01) == 1.0
    assert ppo.klpen_beta_update(1.0, 0.014, 0.01) == 1.0
    assert ppo.klpen_beta_update(1.0, 0.016, 0.01) == 2.0  # 0.016 > 0.015


def test_tiny_ladder_runs(hh_dir, tmp_path, monkeypatch):
    """Rung 1 (REINFORCE, one on-policy step) builds no critic and its update's only ratio is 1; rung 5 (klpen)
    logs the KL penalty's beta, moved from one iteration to the next by klpen_beta_update of the logged drift;
    critic_init=sft starts the critic from the SFT trunk (its head fresh, not the reward model's)."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    write_tiny_checkpoints(out)
    base = TINY + [f"--data_dir={hh_dir}", "--iterations=3", "--eval_prompts=4"]
    ppo.main(base + [f"--out_dir={out}", "--advantage_estimator=reinforce", "--surrogate=cpi", "--ppo_epochs=1",
                     "--minibatch_size=16"])
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert all(r["approx_kl"] == 0 and "value_loss" not in r for r in rows)  # one step on pi_old itself: rho = 1
    assert "critic" not in torch.load(os.path.join(out, "ppo.pt"))
    out5 = str(tmp_path / "out5")
    write_tiny_checkpoints(out5)
    ppo.main(base + [f"--out_dir={out5}", "--advantage_estimator=reward_to_go", "--surrogate=klpen",
                     "--klpen_target=0.001"])
    rows = [json.loads(line) for line in open(os.path.join(out5, "ppo_log.jsonl"))]
    assert rows[0]["klpen_beta"] == 1.0
    for r, nxt in zip(rows, rows[1:]):
        assert nxt["klpen_beta"] == ppo.klpen_beta_update(r["klpen_beta"], r["policy_drift"], 0.001)
    assert torch.load(os.path.join(out5, "ppo.pt"))["klpen_beta"] == ppo.klpen_beta_update(
        rows[-1]["klpen_beta"], rows[-1]["policy_drift"], 0.001)
    out7 = str(tmp_path / "out7")
    write_tiny_checkpoints(out7)
    captured = []
    real_start = ppo.start_run
    monkeypatch.setattr(ppo, "start_run", lambda *a: captured.append(real_start(*a)) or captured[-1])
    monkeypatch.setattr(ppo, "iteration", lambda *a: {"score": 0.0, "kl": 0.0})
    ppo.main(base + [f"--out_dir={out7}", "--critic_init=sft", "--iterations=1"])
    critic, rm = captured[0].critic, captured[0].reward_model
    assert not torch.equal(critic.scalar_head.weight, rm.scalar_head.weight)
    wpe = lambda m: m.transformer.wpe.weight  # the tiny reward model's positions are zeroed, the SFT model's not
    assert torch.equal(wpe(critic), wpe(captured[0].reference)) and not torch.equal(wpe(critic), wpe(rm))


def test_bad_ladder_settings_are_one_line_errors(tmp_path):
    for flags, message in ((["--surrogate=trpo"], "--surrogate=trpo: expected one of clip, klpen, cpi"),
                           (["--klpen_target=0"], "--klpen_target=0.0: expected a value > 0"),
                           (["--advantage_estimator=grpo", "--samples_per_prompt=2", "--surrogate=cpi"],
                            "grpo: GRPO's loss is its own clipped one")):
        with pytest.raises(common.ConfigError, match=message):
            ppo.main(["--device=cpu", f"--out_dir={tmp_path}"] + flags)
