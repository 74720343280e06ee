"""Best-of-n and the lab: the KL of best-of-n against an exact enumeration, best-of-n's choice against a max over
independent samples, and the sweep on a tiny imdb fixture writing every point and both charts."""
import json
import math
import os
import types

import pytest
import torch

import common
import evaluate
import lab
import ppo
import reward
import sft
from model import GPT, GPTConfig


def exact_best_of_n_kl(p, n):
    """KL(q || p) for q the distribution of the best of n draws from the categorical p, outcome i ranked i-th (all
    rewards distinct, ascending in i): q_i = F_i^n - F_{i-1}^n with F the cumulative distribution."""
    cdf = torch.cumsum(p.double(), 0)
    q = cdf ** n - torch.cat([torch.zeros(1, dtype=torch.float64), cdf[:-1]]) ** n
    keep = q > 0
    return (q[keep] * (q[keep] / p.double()[keep]).log()).sum().item()


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_equals_the_closed_form_and_an_exact_enumeration(n):
    assert evaluate.best_of_n_kl(n) == pytest.approx(math.log(n) - (n - 1) / n)
    fine = torch.full((20000,), 1 / 20000)  # many equally likely outcomes: the continuous limit
    assert exact_best_of_n_kl(fine, n) == pytest.approx(evaluate.best_of_n_kl(n), abs=2e-3)
    lumpy = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(n)), 0)
    assert exact_best_of_n_kl(lumpy, n) <= evaluate.best_of_n_kl(n) + 1e-9  # an upper bound for any categorical


def test_best_of_n_takes_the_reward_models_favourite_and_n_1_is_plain_sampling(one_thread):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    rm = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, scalar_head=True)).eval()
    prompts = [{"prompt": [5 + i, 6, 7 + i]} for i in range(6)]
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    cfg = types.SimpleNamespace(eval_batch_size=4, max_new_tokens=6, eval_seed=3)
    rows = evaluate.best_of_n(policy, rm, prompts, rt, cfg, n_max=4)
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert [r["kl"] for r in rows] == [evaluate.best_of_n_kl(n) for n in (1, 2, 4)]
    plain = [evaluate.sample_and_score(policy, None, rm, prompts, rt, 4, 6, seed=3 + j)["scores"] for j in range(4)]
    assert rows[0]["score"] == pytest.approx(plain[0].mean().item(), abs=1e-6)  # n = 1: the plain evaluation
    for row in rows[1:]:  # the chosen answer's proxy score is the best of the first n samples, prompt by prompt
        best = torch.stack(plain[:row["n"]]).max(0).values
        assert row["score"] == pytest.approx(best.mean().item(), abs=1e-6)
    assert rows[2]["score"] >= rows[1]["score"] >= rows[0]["score"]


def test_gae_answers_come_from_ppos_real_config(monkeypatch):
    """The RLOO / GRPO runs get as many answers per iteration as the GAE runs: batch_size x samples_per_prompt of
    ppo.py's config with the lab's --ppo_args on top (flags ppo.py does not know are not ppo.py's business)."""
    cfg = common.parse_config(lab.config, ["--device=cpu"], verbose=False)
    assert lab.gae_answers(cfg, "--batch_size=48") == 48
    assert lab.gae_answers(cfg, "--samples_per_prompt=2 --batch_size=8") == 16
    assert lab.gae_answers(cfg, "--iterations=2 --batch_size=4 --minibatch_size=2 --ptx_coef=0") == 4
    assert lab.gae_answers(cfg, "") == ppo.config["batch_size"] * ppo.config["samples_per_prompt"]  # the CPU preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, for the config logic only
    gpu = common.parse_config(lab.config, ["--device=cuda"], cuda_overrides=lab.cuda_config, verbose=False)
    assert lab.gae_answers(gpu, "") == ppo.cuda_config["batch_size"] * ppo.config["samples_per_prompt"] != \
        ppo.config["batch_size"]  # the CUDA preset's batch, not the CPU default
    assert lab.gae_answers(gpu, "--batch_size=6 --samples_per_prompt=3") == 18


@pytest.mark.parametrize("ppo_args", ["", "--batch_size=48", "--iterations=2 --batch_size=12 --minibatch_size=2"])
def test_critic_free_runs_get_as_many_answers_per_iteration_as_gae(ppo_args, tmp_path, monkeypatch):
    """What lab.run really passes to ppo.main, parsed as ppo.py parses it: the rloo / grpo run answers
    batch_size x samples_per_prompt = the GAE run's answers per iteration, with the lab's samples_per_prompt."""
    passed = {}

    def fake_main(argv):
        cfg = common.parse_config(ppo.config, argv, verbose=False)
        passed[cfg.advantage_estimator] = cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "eval_ppo.json"), "w") as f:
            json.dump({"kl": 0.0, "score": 0.0}, f)
    monkeypatch.setattr(ppo, "main", fake_main)
    cfg = common.parse_config(lab.config, ["--device=cpu", f"--out_dir={tmp_path}", "--samples_per_prompt=4"],
                              verbose=False)
    for method in ("ppo", "rloo", "grpo"):
        lab.run(method, 0.05, cfg, ppo_args)
    gae = passed["gae"].batch_size * passed["gae"].samples_per_prompt
    for estimator in ("rloo", "grpo"):
        assert passed[estimator].samples_per_prompt == 4
        assert passed[estimator].batch_size * 4 == gae, (estimator, passed[estimator].batch_size, gae)


@pytest.mark.slow
def test_the_sweep_writes_every_point_and_both_charts(imdb_root, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    shared = dict(task="imdb", device="cpu", data_dir=imdb_root, out_dir=out, block_size=64, max_new_tokens=6,
                  eval_prompts=4, eval_batch_size=4)
    argv = lambda **kw: [f"--{k}={v}" for k, v in {**shared, **kw}.items()]
    sft.main(argv(n_layer=1, n_head=2, n_embd=32, pretrain_iters=4, pretrain_batch_size=2, sft_iters=4, batch_size=4,
                  eval_every=0, eval_examples=4, n_answers=1))
    reward.main(argv(n_prompts=8, n_test_prompts=4, answers_per_prompt=3, max_iters=2, batch_size=4, eval_every=0,
                     norm_examples=4, n_show=0))
    report = lab.main(argv(ppo_betas="0.05,0.2", dpo_betas="0.1", bon_max_n=4, eval_every=1, critic_free="grpo",
                           samples_per_prompt=2,
                           ppo_args="--iterations=2 --batch_size=4 --minibatch_size=2 --ptx_coef=0",
                           dpo_args="--max_iters=2 --batch_size=2 --eval_every=0 --eval_pairs=4"))
    rows = [json.loads(line) for line in open(os.path.join(out, "lab", "points.jsonl"))]
    methods = [(r["method"], r.get("beta", r.get("n"))) for r in rows]
    assert methods[:5] == [("sft", 0.0), ("ppo", 0.05), ("ppo", 0.2), ("grpo", 0.2), ("dpo", 0.1)]
    assert [r["n"] for r in rows if r["method"] == "best-of-n"] == [1, 2, 4]
    curve = [r for r in rows if r["method"] == "ppo-curve"]
    assert len(curve) == 3 and curve[0]["kl"] == 0 and all(r["beta"] == 0.05 for r in curve)  # SFT + 2 evaluations
    policies = [r for r in rows if r["method"] in ("sft", "ppo", "grpo", "dpo")]
    assert all({"gold", "gold_se", "score", "kl"} <= set(r) for r in policies)
    grpo = [json.loads(line) for line in open(os.path.join(out, "lab", "grpo_beta0.2", "ppo_log.jsonl"))]
    assert "value_loss" not in grpo[0]  # the critic-free run builds no critic
    assert os.path.islink(os.path.join(out, "lab", "dpo_beta0.1", "comparisons.pt"))  # the shared comparisons
    for f in ("frontier.png", "overoptimisation.png"):
        assert os.path.getsize(os.path.join(out, "lab", f)) > 1000, f
    assert len(report["points"]) == 5
    # finished runs are kept, not redone
    again = lab.main(argv(ppo_betas="0.05,0.2", dpo_betas="0.1", bon_max_n=4, critic_free="grpo", samples_per_prompt=2))
    assert [p["gold"] for p in again["points"]] == [p["gold"] for p in report["points"]]


def test_distinct_n_and_the_proxy_gold_correlation_by_hand():
    """distinct-n counts distinct n-grams over all answers (a loop over a set here); corr(RM, gold) is Pearson's r
    (computed from its definition)."""
    answers = [[1, 2, 3, 1, 2], [1, 2, 9], [], [7]]
    grams = []
    for a in answers:
        for i in range(len(a) - 1):
            grams.append((a[i], a[i + 1]))
    assert len(grams) == 6 and evaluate.distinct_n(answers, 2) == len(set(grams)) / 6  # (1,2) thrice: 4 / 6
    assert evaluate.distinct_n([[5, 5, 5, 5]] * 3, 2) == 1 / 9 and evaluate.distinct_n([[]], 2) == 0
    scores, gold = torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([0.5, 0.1, 2.0, 1.0])
    sx, sy = scores - scores.mean(), gold - gold.mean()
    r = (sx * sy).sum() / (sx.square().sum() * sy.square().sum()).sqrt()
    s = evaluate.summarize(dict(scores=scores, gold=gold, responses=answers, lengths=torch.tensor([5, 3, 0, 1]),
                                eos=torch.zeros(4)))
    assert s["rm_gold_corr"] == pytest.approx(r.item(), abs=1e-6) and s["distinct2"] == pytest.approx(4 / 6)
