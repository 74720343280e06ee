"""Best-of-n and the lab: the KL of best-of-n against an exact enumeration, best-of-n's choice against a max over
independent samples, and the sweep on a tiny imdb fixture writing every point and both charts."""
import itertools
import json
import math
import os
import types

import pytest
import torch

import common
import data
import evaluate
import lab
import ppo
from conftest import tiny_imdb_stages
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


def brute_force_best_of_n(proxy, values, n):
    """The average, over every n-subset of each prompt's pool, of the value of the subset's proxy-argmax (a tie goes
    to the answer sampled later, as documented)."""
    out = []
    for p in range(proxy.shape[0]):
        subsets = list(itertools.combinations(range(proxy.shape[1]), n))
        best = [max(S, key=lambda k: (proxy[p, k].item(), k)) for S in subsets]
        out.append(sum(values[p, k].item() for k in best) / len(subsets))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_from_one_pool_is_the_average_over_every_subset(ties):
    g = torch.Generator().manual_seed(1)
    proxy, values = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    if ties:  # a coarse reward model: many equal scores
        proxy = proxy.round()
    for n in range(1, 9):
        assert torch.allclose(evaluate.best_of_n_from_pool(proxy, values, n), brute_force_best_of_n(proxy, values, n),
                              atol=1e-12), n
    assert torch.allclose(evaluate.best_of_n_from_pool(proxy, values, 1), values.double().mean(1))  # n = 1: any answer
    assert torch.equal(evaluate.best_of_n_from_pool(proxy, proxy, 8), proxy.double().max(1).values)  # n = N: the best
    with pytest.raises(ValueError):
        evaluate.best_of_n_from_pool(proxy, values, 9)


def test_best_of_n_curve_means_and_standard_errors_over_prompts():
    g = torch.Generator().manual_seed(2)
    proxy, gold = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    rows = evaluate.best_of_n_curve(proxy, gold)
    assert [r["n"] for r in rows] == [1, 2, 4, 8, 16]
    assert [r["kl"] for r in rows] == [evaluate.best_of_n_kl(n) for n in (1, 2, 4, 8, 16)]
    for r in rows:
        per_prompt = brute_force_best_of_n(proxy, gold, r["n"]) if r["n"] <= 4 else \
            evaluate.best_of_n_from_pool(proxy, gold, r["n"])
        assert r["gold"] == pytest.approx(per_prompt.mean().item())
        assert r["gold_se"] == pytest.approx(per_prompt.std().item() / 5 ** 0.5)
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)  # the proxy of the favourite only rises


@pytest.mark.parametrize("form, alpha, beta", [("bon", 1.3, 0.25), ("rl", 0.6, 0.3), ("bon", 0.8, -0.05)])
def test_gao_fits_recover_known_coefficients_and_peaks(form, alpha, beta):
    kl = [0.0, 0.3, 1.0, 2.0, 4.0, 7.0, 11.0, 16.0, 25.0]
    gain = [lab.gao_form(math.sqrt(k), alpha, beta, form) for k in kl]
    fit = lab.fit_gao(kl, gain, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
    if beta <= 0:
        assert fit["peak_kl"] is None  # the fitted gold keeps rising: no peak
        return
    d = torch.linspace(1e-3, 20, 200001, dtype=torch.float64).tolist()  # the peak, found by a grid search
    best = max(d, key=lambda x: lab.gao_form(x, alpha, beta, form))
    assert fit["peak_kl"] == pytest.approx(best ** 2, rel=1e-3)
    assert fit["peak_gain"] == pytest.approx(lab.gao_form(best, alpha, beta, form), rel=1e-6)
    with pytest.raises(ValueError):
        lab.fit_gao([0.0, 1.0], [0.0, 1.0], form)  # one point with KL > 0 fixes nothing


def test_the_rl_form_is_drawn_only_with_a_peak_and_over_the_kl_the_run_covered():
    rows = [dict(kl=k) for k in (0.0, 9.0, 16.0, 4.0)]  # KL out to 16 nats and back: sqrt(KL) up to 4
    peaked = dict(form="rl", alpha=0.6, beta=0.3)
    ds, gain = lab.fit_line(peaked, rows)
    assert ds[0] == 0 and ds[-1] == pytest.approx(4.0) and ds == sorted(ds)
    assert gain == [lab.gao_form(d, 0.6, 0.3, "rl") for d in ds]
    assert lab.fit_label("rm", peaked, (ds, gain)) == "rm"
    back_and_forth = lab.fit_gao([0, 9, 20, 16, 15], [0, 0.7, 3.4, 2.9, 2.85], "rl")  # KL overshoots, comes back
    for fit in (dict(form="rl", alpha=0.6, beta=0.0), dict(form="rl", alpha=-0.7, beta=-0.5), back_and_forth):
        assert fit["beta"] <= 0 and lab.fit_line(fit, rows) is None
        assert "beta_rl" in lab.fit_label("rm", fit, None)  # the legend says why
    assert lab.fit_line(None, rows) is None
    assert lab.fit_line(dict(form="bon", alpha=0.7, beta=-0.02), rows) is not None  # best-of-n: drawn whatever beta


def test_a_ppo_run_is_drawn_in_iteration_order_with_arrows_from_each_evaluation_to_the_next():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [dict(iteration=5 * i, kl=k, gold=g) for i, (k, g) in enumerate([(0, 1.0), (16, 3.0), (9, 2.5), (4, 1.5)])]
    xs, ys = lab.gains(rows, "gold")
    assert xs == [0.0, 4.0, 3.0, 2.0] and ys == [0.0, 2.0, 1.5, 0.5]  # KL goes back: kept, not sorted away
    fig, ax = plt.subplots()
    lab.draw_trajectory(ax, xs, ys, "C0", "rm")
    arrows = [(tuple(a.xyann), tuple(a.xy)) for a in ax.texts]
    assert arrows == list(zip(zip(xs, ys), zip(xs[1:], ys[1:])))
    start, end = ax.lines[-2], ax.lines[-1]  # the hollow circle, the square
    assert (list(start.get_xdata()), list(end.get_xdata()), end.get_marker()) == ([0.0], [2.0], "s")
    plt.close(fig)

def test_over_optimisation_is_a_gold_fall_beyond_two_standard_errors_while_the_proxy_holds():
    row = lambda it, gold, score, se=0.1: dict(iteration=it, gold=gold, gold_se=se, score=score, kl=float(it))
    rise = [row(0, 0.0, -1.0), row(5, 1.0, 0.5), row(10, 1.5, 1.0)]
    assert lab.peak_and_end(rise)[2] is False and lab.peak_and_end(rise)[0]["iteration"] == 10
    hacked = rise + [row(15, 1.2, 2.0)]  # gold -0.3 > 2 * sqrt(0.1^2 + 0.1^2) = 0.28, proxy up: gamed
    assert lab.peak_and_end(hacked)[2] is True
    assert lab.peak_and_end(rise + [row(15, 1.25, 2.0)])[2] is False  # -0.25: within two standard errors
    assert lab.peak_and_end(rise + [row(15, 1.0, 0.8)])[2] is False  # gold and proxy fall together: not gamed


def test_biased_labeller_weight_zero_is_the_judge_and_a_large_weight_puts_the_feature_first():
    g = torch.Generator().manual_seed(3)
    gold = torch.randn(50, 4, generator=g, dtype=torch.float64)
    answers = [[("great film" + "!" * ((i + k) % 3 == 0)) if (i * k) % 5 else "fine" for k in range(4)]
               for i in range(50)]
    judge_order = data.plackett_luce_ranking(gold, 0.0)
    assert torch.equal(data.plackett_luce_ranking(data.biased_labeller_scores(gold, answers, 0.0), 0.0), judge_order)
    order = data.plackett_luce_ranking(data.biased_labeller_scores(gold, answers, 100.0, "!"), 0.0)
    for row, o in zip(answers, order.tolist()):
        if any("!" in a for a in row):
            assert "!" in row[o[0]]  # an answer with the feature always ranks first
    scores = data.biased_labeller_scores(gold, [["a!!b!", "", "!", "x"]] + answers[1:], 0.5)
    assert scores[0].tolist() == pytest.approx((gold[0] + torch.tensor([1.5, 0.0, 0.5, 0.0], dtype=torch.float64))
                                               .tolist())  # 0.5 per "!" by hand


def test_relabelled_rankings_keep_every_answer_with_its_gold():
    from data.tokenizer import get_tokenizer
    enc = get_tokenizer(8192)
    texts = [[" good!", " bad", " great!!", " meh"], [" a", " b!", " c", " d"]]
    rankings = [dict(prompt=[1, 2], responses=[enc.encode(t) for t in row], gold=[2.0, 1.0, 0.5, -1.0])
                for row in texts]
    assert data.relabel_rankings(rankings, 0.0, "!", 8192)[0]["responses"] == rankings[0]["responses"]  # the judge's
    out = data.relabel_rankings(rankings, 1.0, "!", 8192)
    labelled = [data.decode(y, 8192) for y in out[0]["responses"]]
    assert labelled == [" good!", " great!!", " bad", " meh"]  # labeller scores 3, 2.5, 1, -1
    assert out[0]["gold"] == [2.0, 0.5, 1.0, -1.0] and out[0]["labeller"] == [3.0, 2.5, 1.0, -1.0]
    assert [data.decode(y, 8192) for y in out[1]["responses"]] == [" a", " b!", " c", " d"]  # 2, 2, 0.5, -1: stable


def test_gae_answers_come_from_ppos_real_config(monkeypatch):
    """The RLOO / GRPO runs get as many answers per iteration as the GAE runs: batch_size x samples_per_prompt of
    ppo.py's config with the lab's --ppo_args on top (flags ppo.py does not know are not ppo.py's business)."""
    cfg = common.parse_config(lab.config, ["--device=cpu"], verbose=False)
    assert lab.gae_answers(cfg, "--batch_size=48") == 48
    assert lab.gae_answers(cfg, "--samples_per_prompt=2 --batch_size=8") == 16
    assert lab.gae_answers(cfg, "--iterations=2 --batch_size=4 --minibatch_size=2 --ptx_coef=0") == 4
    assert lab.gae_answers(cfg, "") == ppo.config["batch_size"] * ppo.config["samples_per_prompt"]  # the CPU preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend, for the config logic only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
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


def test_over_seeds_means_every_figure_and_gives_the_range_of_gold_kl_and_score():
    a = dict(method="ppo", beta=0.2, iteration=5, n_prompts=256, gold=1.0, gold_se=0.1, kl=5.0, score=0.5)
    b = dict(a, gold=2.0, gold_se=0.3, kl=7.0, score=1.5)
    c = dict(a, gold=1.5, gold_se=0.2, kl=9.0, score=-0.5)
    out = lab.over_seeds([a, b, c])
    assert out["gold"] == pytest.approx(1.5) and out["gold_se"] == pytest.approx(0.2) and out["kl"] == 7.0
    assert (out["gold_low"], out["gold_high"], out["kl_low"], out["kl_high"]) == (1.0, 2.0, 5.0, 9.0)
    assert (out["score_low"], out["score_high"], out["n_seeds"], out["interval"]) == (-0.5, 1.5, 3, "min-max")
    assert (out["method"], out["beta"], out["iteration"], out["n_prompts"]) == ("ppo", 0.2, 5, 256)
    assert lab.over_seeds([a]) == a  # one seed: its point as it is
    assert lab.bars([out, a], "gold") == [[0.5, 0.1], [0.5, 0.1]] and lab.bars([a], "kl") == [[0.0], [0.0]]


def test_the_sweep_runs_each_seed_in_its_own_folder_and_evaluates_only_the_drawn_curves(tmp_path, monkeypatch):
    """--seeds=3: every frontier point and every run against the biased reward model at seeds 1337, 1338, 1339
    (the first in the folder a one-seed lab uses), the smaller reward models' curve at one; eval_every only where a
    curve is drawn (the smallest beta, the reward models' runs)."""
    calls = []

    def fake_main(argv):
        cfg = common.parse_config(ppo.config, argv, verbose=False)
        calls.append((os.path.basename(cfg.out_dir), cfg.seed, cfg.eval_every))
        with open(os.path.join(cfg.out_dir, "eval_ppo.json"), "w") as f:
            json.dump({"kl": 1.0 + cfg.seed - 1337, "gold": 0.1 * (cfg.seed - 1337), "score": 0.0}, f)
    monkeypatch.setattr(ppo, "main", fake_main)
    cfg = common.parse_config(lab.config, ["--device=cpu", f"--out_dir={tmp_path}", "--seeds=3", "--critic_free=",
                                           "--dpo_betas=", "--ppo_betas=0.05,0.2", "--bias_betas=0.5"], verbose=False)
    rms = [dict(name="rm3000", path=str(tmp_path / "rm.pt"), bias=0.0, default=True),
           dict(name="rm300", path=str(tmp_path / "rm300.pt"), bias=0.0, default=False),
           dict(name="rm_biased", path=str(tmp_path / "rmb.pt"), bias=1.0, default=False)]
    points, curves, biased = lab.run_sweep(cfg, rms)
    seeds = (("", 1337), ("_seed1338", 1338), ("_seed1339", 1339))
    assert calls == [(f"ppo_beta0.05{s}", seed, 5) for s, seed in seeds] \
        + [(f"ppo_beta0.2{s}", seed, 0) for s, seed in seeds] + [("ppo_rm300_beta0.05", 1337, 5)] \
        + [(f"ppo_rm_biased_beta0.5{s}", seed, 5) for s, seed in seeds]
    assert [p["n_seeds"] for p in points] == [3, 3] and points[0]["kl"] == 2.0 and points[0]["kl_high"] == 3.0
    assert curves == {"rm3000": os.path.join(str(tmp_path), "lab", "ppo_beta0.05"),
                      "rm300": os.path.join(str(tmp_path), "lab", "ppo_rm300_beta0.05")}
    assert [os.path.basename(f) for f in biased[0.5]] == ["ppo_rm_biased_beta0.5", "ppo_rm_biased_beta0.5_seed1338",
                                                          "ppo_rm_biased_beta0.5_seed1339"]


@pytest.mark.slow
def test_the_lab_writes_every_point_and_every_chart_and_keeps_what_it_ran(imdb_root, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    argv = tiny_imdb_stages(imdb_root, out)
    lab_args = dict(ppo_betas="0.05,0.2", dpo_betas="0.1", eval_every=1, critic_free="grpo", samples_per_prompt=2,
                    rm_sizes="4", bias_betas="0.05,1", bon_prompts=3, bon_pool=4,
                    rm_args="--max_iters=2 --batch_size=4",
                    ppo_args="--iterations=2 --batch_size=4 --minibatch_size=2 --ptx_coef=0",
                    dpo_args="--max_iters=2 --batch_size=2 --eval_every=0 --eval_pairs=4")
    report = lab.main(argv(**lab_args))
    rows = [json.loads(line) for line in open(os.path.join(out, "lab", "points.jsonl"))]
    methods = [(r["method"], r.get("beta")) for r in rows if r["method"] in ("sft", "ppo", "grpo", "dpo")]
    assert methods == [("sft", 0.0), ("ppo", 0.05), ("ppo", 0.2), ("grpo", 0.2), ("dpo", 0.1)]
    rms = [r["rm"] for r in rows if r["method"] == "reward-model"]
    n_all = len(torch.load(os.path.join(out, "comparisons.pt"), weights_only=False)["train"])
    assert rms == [f"rm{n_all}", "rm4", "rm_biased"]
    for name in rms + ["judge"]:  # best-of-n from one pool of 4 answers per prompt, under every ranker
        assert [r["n"] for r in rows if r["method"] == "best-of-n" and r["rm"] == name] == [1, 2, 4]
    curves = {(r["rm"], r["beta"]) for r in rows if r["method"] == "ppo-curve"}
    assert curves == {(f"rm{n_all}", 0.05), ("rm4", 0.05), ("rm_biased", 0.05), ("rm_biased", 1.0)}
    for key in curves:  # SFT at iteration 0, then an evaluation after each of the 2 iterations
        curve = [r for r in rows if r["method"] == "ppo-curve" and (r["rm"], r["beta"]) == key]
        assert [r["iteration"] for r in curve] == [0, 1, 2] and curve[0]["kl"] == 0
        assert all({"gold", "gold_se", "score", "score_se", "kl"} <= set(r) for r in curve)
    for r in rows:
        if r["method"] == "reward-model":
            assert {"gold_accuracy", "gold_accuracy_clear", "pool_corr", "fits"} <= set(r)
            assert ("labeller_accuracy" in r) == (r["rm"] == "rm_biased")
    small = torch.load(os.path.join(out, "lab", "rm4", "rm.pt"), weights_only=False)
    assert small["config"]["train_rankings"] == 4 and small["config"]["out_dir"].endswith("rm4")
    assert os.path.islink(os.path.join(out, "lab", "ppo_rm_biased_beta1.0", "rm.pt"))  # PPO against the biased RM
    assert os.path.realpath(os.path.join(out, "lab", "ppo_rm_biased_beta1.0", "rm.pt")) == \
        os.path.realpath(os.path.join(out, "lab", "rm_biased", "rm.pt"))
    grpo = [json.loads(line) for line in open(os.path.join(out, "lab", "grpo_beta0.2", "ppo_log.jsonl"))]
    assert "value_loss" not in grpo[0]  # the critic-free run builds no critic
    assert os.path.islink(os.path.join(out, "lab", "dpo_beta0.1", "comparisons.pt"))  # the shared comparisons
    for f in ("frontier.png", "overoptimisation.png", "kl_penalty.png", "rm_scaling.png"):
        assert os.path.getsize(os.path.join(out, "lab", f)) > 1000, f
    # finished runs, reward models and the pool are kept, not redone
    stamps = {f: os.path.getmtime(os.path.join(out, "lab", f)) for f in ("rm4/rm.pt", "pool.pt", "ppo_beta0.05/ppo.pt")}
    again = lab.main(argv(**lab_args))
    assert [p["gold"] for p in again["points"]] == [p["gold"] for p in report["points"]]
    assert again["best_of_n"] == report["best_of_n"]
    assert stamps == {f: os.path.getmtime(os.path.join(out, "lab", f)) for f in stamps}


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


def test_no_prompts_give_no_answers(one_thread):
    """sft.py --n_answers=0 asks for the answers to no prompts: an empty list, not a KeyError."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    rt = common.setup_runtime(types.SimpleNamespace(device="cpu", dtype="float32", seed=0))
    assert evaluate.generate_answers(policy, [], rt, max_new_tokens=4) == []
