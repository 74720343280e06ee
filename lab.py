"""
The lab: how much gold reward each method buys per nat of KL, and why the recipe needs a KL penalty at all.

    python lab.py                                     # imdb CPU preset: everything below
    python lab.py --ppo_betas=0.05 --dpo_betas= --critic_free= --rm_sizes= --bias_betas=0.05   # a quick look
    python lab.py --seeds=3                           # each frontier point and biased run at 3 training seeds

It reuses out/<task>/sft.pt, rm.pt and comparisons.pt (running sft.py and reward.py first if they are missing) and
runs every policy and every extra reward model into its own folder under out/<task>/lab/, so a second `python
lab.py` only runs what is missing. It draws into out/<task>/lab/:
- frontier.png: gold score against KL(pi || pi_ref) for PPO, RLOO, GRPO and DPO at several betas, best-of-n and
  SFT (the DPO paper's figure 2);
- overoptimisation.png: gold (solid) and proxy (dashed) against sqrt(KL) for best-of-n and along PPO (each run a
  trajectory in iteration order: arrows from start to end), one colour per reward model: trained on nested subsets
  of the comparisons (rm_sizes) and on a biased labeller's rankings, with Gao et al.'s fitted forms, the RL one only
  where it has a peak (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", figure 1);
- kl_penalty.png: PPO against the biased reward model at several betas: what the KL penalty holds back, and not;
- rm_scaling.png: each reward model's agreement with the judge on the same held-out pairs against its comparisons.
Best-of-n comes from one pool of bon_pool answers to each of bon_prompts evaluation prompts, with the exact
expectation over subsets (evaluate.best_of_n_from_pool). Every point goes to out/<task>/lab/points.jsonl, and the
tables behind the charts are printed. The over-optimisation part needs the gold judge (imdb).
"""
import json
import math
import os

import torch

import common
import data
import dpo
import evaluate
import ppo
import reward
from checkpoint import load_checkpoint, make_missing_checkpoints

S = common.setting  # a default with the values it allows, checked by the config parser
config = dict(common.SHARED,
    ppo_betas="0.05,0.1,0.2",    # one PPO run per beta against rm.pt (the smallest: the over-optimisation curve)
    dpo_betas="0.05,0.1,0.5",    # one DPO run per beta
    critic_free="rloo,grpo",     # one ppo.py run of each critic-free estimator, at critic_free_beta ("" = none)
    critic_free_beta=S(0.2, ">= 0"),  # the beta of the critic-free runs
    samples_per_prompt=S(4, ">= 2"),  # the critic-free runs' answers to each of batch_size / samples_per_prompt
                                      # prompts: as many answers per iteration as GAE's run
    ppo_args="",                 # more ppo.py flags for every PPO run, e.g. "--iterations=60 --reward=gold"
    dpo_args="",                 # more dpo.py flags for every DPO run
    rm_args="",                  # more reward.py flags for the lab's reward models (rm.pt is python reward.py's)
    eval_every=S(5, ">= 1"),     # PPO iterations between the evaluations of a curve (runs whose curve is drawn)
    seeds=S(1, ">= 1"),          # training seeds of each frontier point and each run against the biased reward model
                                 # (seed, seed + 1, ...): their mean, and the interval over the seeds
    # over-optimisation (imdb): more reward models, and PPO against each at the smallest of ppo_betas
    rm_sizes="300,1000",         # reward models on the first n train rankings of comparisons.pt (rm.pt has them all)
    bias_weight=S(1.0, ">= 0"),  # a labeller with a bias: + this many log-odds per bias_feature in an answer (0: none)
    bias_feature="!",            # the text the biased labeller favours
    bias_betas="0.05,0.2,0.5,1",  # PPO against the biased reward model at each of these betas
    bon_prompts=S(64, ">= 1"),   # best-of-n from one pool: the first bon_prompts evaluation prompts
    bon_pool=S(256, ">= 1"),     # best-of-n: N answers to each, sampled once from the SFT policy; n = 1, 2, 4, ..., N
)
cuda_config = dict(common.SHARED_CUDA)


def floats(text):
    return [float(x) for x in text.split(",") if x]


def smallest_beta(cfg):
    """The beta of the over-optimisation curves: the smallest of ppo_betas (the longest way from the reference)."""
    return min(floats(cfg.ppo_betas) or [0.05])


def link(folder, **files):
    """Make `folder` and symlink each name in it to its source path (absolute); an existing entry is kept."""
    os.makedirs(folder, exist_ok=True)
    for name, src in files.items():
        dst = os.path.join(folder, name)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
    return folder


def run_folder(cfg, method, beta, rm=None):
    """out/<task>/lab/<method>[_<rm>]_beta<beta>/ with links to the shared sft.pt and comparisons.pt and to the
    reward model `rm` (a dict from reward_models; None: out/<task>/rm.pt)."""
    tag = "" if rm is None or rm["default"] else f"_{rm['name']}"
    return link(os.path.join(cfg.out_dir, "lab", f"{method}{tag}_beta{beta}"),
                **{"sft.pt": os.path.join(cfg.out_dir, "sft.pt"),
                   "comparisons.pt": os.path.join(cfg.out_dir, "comparisons.pt"),
                   "rm.pt": rm["path"] if rm else os.path.join(cfg.out_dir, "rm.pt")})


def gae_answers(cfg, extra):
    """Answers per iteration of the GAE runs: the batch_size ppo.py really uses with this lab's flags (its preset for
    the device, then the shared flags and --ppo_args), not the CPU default."""
    argv = common.shared_flags(cfg, ppo.config) + [a for a in extra.split() if a.split("=")[0][2:] in ppo.config]
    ppo_cfg = common.parse_config(ppo.config, argv, cuda_overrides=ppo.cuda_config, verbose=False)
    return ppo_cfg.batch_size * ppo_cfg.samples_per_prompt


def run(method, beta, cfg, extra, rm=None, seed=None, curve=False, progress=""):
    """One run of ppo.py (method ppo, rloo or grpo) or dpo.py at `beta` and training `seed` (None: cfg.seed) in its
    own folder (kept if it already finished; another seed's name ends in _seed<seed>), evaluated every eval_every
    iterations where its `curve` is drawn; `progress` ("run 3 of 20") heads what it prints. Returns its point and the
    folder."""
    seed = cfg.seed if seed is None else seed
    folder, stage = run_folder(cfg, method, beta, rm), "dpo" if method == "dpo" else "ppo"
    folder = folder if seed == cfg.seed else link(f"{folder}_seed{seed}", **{
        f: os.path.join(folder, f) for f in ("sft.pt", "comparisons.pt", "rm.pt")})
    argv = common.shared_flags(cfg) + [f"--out_dir={folder}", f"--beta={beta}", f"--seed={seed}"]  # last flag wins
    if stage == "ppo" and curve:
        argv.append(f"--eval_every={cfg.eval_every}")
    argv += extra.split()
    if method in ("rloo", "grpo"):  # k answers per prompt, as many answers per iteration as GAE (after `extra`, whose
        k = cfg.samples_per_prompt  # --batch_size is the GAE run's: the last flag wins)
        argv += [f"--advantage_estimator={method}", f"--samples_per_prompt={k}",
                 f"--batch_size={max(1, gae_answers(cfg, extra) // k)}"]
    path = os.path.join(folder, f"{stage}.pt")
    if not (os.path.exists(path) and load_checkpoint(path, stage=stage)["finished"]):
        against = "" if rm is None else f" against {rm['name']}"
        print(f"\n===== lab {progress}: {method} beta={beta}{against} seed {seed} -> {folder}")
        (dpo if stage == "dpo" else ppo).main(argv)
    point = json.load(open(os.path.join(folder, f"eval_{stage}.json")))
    return dict(method=method, beta=beta, **{k: v for k, v in point.items() if k != "eval"}), folder


def over_seeds(points):
    """One point from the same point of several training seeds: every number the mean over the seeds, and for gold,
    kl and score their interval over the seeds (evaluate.seed_interval) as <key>_low, <key>_high, with the seeds'
    count and the interval's name (evaluate.INTERVAL_NAMES); one seed: its point as it is."""
    if len(points) == 1:
        return points[0]
    same = lambda k: all(p[k] == points[0][k] for p in points)  # e.g. the method, beta, an iteration
    out = {k: v if same(k) or not isinstance(v, float) else sum(p[k] for p in points) / len(points)
           for k, v in points[0].items()}
    for key in ("gold", "kl", "score"):
        if points[0].get(key) is not None:
            iv = evaluate.seed_interval([p[key] for p in points])
            out.update({f"{key}_low": iv["low"], f"{key}_high": iv["high"]})
    return dict(out, n_seeds=len(points), interval=evaluate.INTERVAL_NAMES[iv["how"]])


def ppo_curve(folder, sft_point):
    """The evaluations a PPO run logged every eval_every iterations, after `iteration` iterations, starting from the
    SFT policy's (iteration 0): dicts iteration, kl, score (+ score_se), gold (+ gold_se)."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "ppo_log.jsonl"))]
    keys = ("kl", "score", "score_se", "gold", "gold_se")
    return [dict(iteration=0, **{k: sft_point.get(k) for k in keys})] + [
        dict(iteration=r["step"] + 1, **{k: r.get(f"eval_{k}") for k in keys}) for r in rows if "eval_kl" in r]


# ----------------------------------------------------------------------------- reward models and best-of-n
def reward_models(cfg):
    """The reward models of the over-optimisation lab, trained where missing: rm.pt (every train ranking), one on the
    first n train rankings for each n of rm_sizes (nested subsets of the same comparisons), and one on the biased
    labeller's rankings of the same answers (bias_weight). Returns a list of dicts name, path, n (train rankings),
    bias (the labeller's weight), default (True for rm.pt)."""
    n_all = len(torch.load(os.path.join(cfg.out_dir, "comparisons.pt"), weights_only=False)["train"])
    rms = [dict(name=f"rm{n_all}", path=os.path.join(cfg.out_dir, "rm.pt"), n=n_all, bias=0.0, default=True)]
    wanted = [(f"rm{n}", [f"--train_rankings={n}"], n, 0.0) for n in map(int, floats(cfg.rm_sizes)) if n < n_all]
    if cfg.bias_weight:
        wanted.append(("rm_biased", [f"--label_bias_weight={cfg.bias_weight}", f"--label_bias={cfg.bias_feature}"],
                       n_all, cfg.bias_weight))
    for name, flags, n, bias in wanted:
        folder = link(os.path.join(cfg.out_dir, "lab", name), **{
            "sft.pt": os.path.join(cfg.out_dir, "sft.pt"),
            "comparisons.pt": os.path.join(cfg.out_dir, "comparisons.pt")})
        path = os.path.join(folder, "rm.pt")
        if not (os.path.exists(path) and load_checkpoint(path, stage="rm")["finished"]):
            print(f"\n===== reward model {name} -> {folder}")
            reward.main(common.shared_flags(cfg, reward.config) + [f"--out_dir={folder}", "--n_show=0"] + flags
                        + cfg.rm_args.split())
        rms.append(dict(name=name, path=path, n=n, bias=bias, default=False))
    return rms


def agreement(rm, model, test, cfg, rt):
    """How a reward model orders the held-out pairs of comparisons.pt (the same pairs for every reward model): with
    the judge (all pairs; pairs the judge separates by >= 1 log-odds) and, for a biased one, with its own labeller."""
    rewards = torch.tensor(reward.score_rankings(model, test, rt, cfg.eval_batch_size))  # (P, K)
    pairs, chosen, rejected = reward.pair_scores(test, rewards)
    out = reward.gold_agreement(pairs, chosen, rejected)
    if rm["bias"]:  # the labeller's order of the same pairs: gold + bias per feature
        relabelled = data.relabel_rankings(test, rm["bias"], cfg.bias_feature, cfg.vocab_size)
        rewards = torch.tensor(reward.score_rankings(model, relabelled, rt, cfg.eval_batch_size))
        out["labeller_accuracy"] = evaluate.win_rate(*reward.pair_scores(relabelled, rewards)[1:])
    return out


def answer_pool(cfg, rt, sft, judge, prompts):
    """bon_pool answers of the SFT policy to each of `prompts` (sampler seed eval_seed), with their gold scores,
    cached in out/<task>/lab/pool.pt with every reward model's scores of them (added as they are computed)."""
    path = os.path.join(cfg.out_dir, "lab", "pool.pt")
    settings = dict(n_prompts=len(prompts), pool=cfg.bon_pool, seed=cfg.eval_seed, max_new_tokens=cfg.max_new_tokens,
                    sft=os.path.getmtime(os.path.join(cfg.out_dir, "sft.pt")))
    if os.path.exists(path):
        pool = torch.load(path, weights_only=False)
        if pool["settings"] == settings:
            return pool
    repeated = [p for p in prompts for _ in range(cfg.bon_pool)]  # N consecutive samples of each prompt
    answers = evaluate.generate_answers(sft, repeated, rt, cfg.max_new_tokens, seed=cfg.eval_seed,
                                        batch_size=cfg.eval_batch_size, desc="best-of-n pool")
    gold = data.gold_scores(judge, [p["prompt"] for p in repeated], answers, cfg.vocab_size) if judge else None
    pool = dict(settings=settings, examples=[dict(prompt=p["prompt"], chosen=a) for p, a in zip(repeated, answers)],
                gold=None if gold is None else gold.view(len(prompts), -1), scores={})
    save_pool(path, pool)
    return pool


def save_pool(path, pool):
    with common.atomic_write(path) as tmp:
        torch.save(pool, tmp)


# ----------------------------------------------------------------------------- Gao et al.'s functional forms
def fit_gao(kl, gain, form):
    """Least-squares fit of Gao et al. 2022's functional forms (section 3) to points (KL, gold gain over SFT), with
    d = sqrt(KL):   best-of-n ("bon"):  gain(d) = d (alpha - beta d)       RL ("rl"):  gain(d) = d (alpha - beta log d)
    Both are linear in (alpha, beta), so the fit is one least-squares solve through the origin (d = 0 adds nothing).
    Returns dict alpha, beta and the peak: d* = alpha / (2 beta) for bon, exp(alpha / beta - 1) for rl (where the
    derivative is zero), as peak_kl = d*^2 and peak_gain = gain(d*); both None when there is no turn at d > 0 (beta
    <= 0: the fitted gold keeps rising; or best-of-n with alpha <= 0: it falls from the start).
    Raises ValueError for an unknown form or fewer than two points with KL > 0."""
    if form not in ("bon", "rl"):
        raise ValueError(f"fit_gao: form {form!r}, expected 'bon' or 'rl'")
    d = torch.tensor(kl, dtype=torch.float64).clamp(min=0).sqrt()
    y = torch.tensor(gain, dtype=torch.float64)
    keep = d > 0
    if keep.sum() < 2:
        raise ValueError(f"fit_gao: {int(keep.sum())} points with KL > 0, need two")
    d, y = d[keep], y[keep]
    shape = d * d if form == "bon" else d * d.log()  # the term beta multiplies (with a minus sign)
    X = torch.stack([d, -shape], 1)  # (M, 2)
    alpha, beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    fit = dict(form=form, alpha=alpha, beta=beta, peak_kl=None, peak_gain=None)
    peak = (alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)) if beta > 0 else 0.0
    if peak > 0:
        fit.update(peak_kl=peak ** 2, peak_gain=gao_form(peak, alpha, beta, form))
    return fit


def gao_form(d, alpha, beta, form):
    """gain(d) of fit_gao's forms at d = sqrt(KL) >= 0 (float)."""
    if d <= 0:
        return 0.0
    return d * (alpha - beta * (d if form == "bon" else math.log(d)))


# ----------------------------------------------------------------------------- charts
def plot(cfg, points, bon, curves, biased_runs, rms, y):
    """frontier.png, and with a judge overoptimisation.png (plot_overoptimisation), kl_penalty.png and rm_scaling.png
    (module docstring).
    points: the frontier's policies; bon: rm name -> best-of-n rows; curves: rm name -> PPO curve at the smallest
    beta; biased_runs: beta -> PPO curve against the biased reward model; rms: reward models with their figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = os.path.join(cfg.out_dir, "lab")
    label = {"gold": "gold score (judge log-odds)", "score": "reward-model score"}[y]
    default = rms[0]["name"]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    b = bon[default]
    ax.errorbar([r["kl"] for r in b], [r[y] for r in b], yerr=[r[f"{y}_se"] for r in b], marker=".", capsize=2,
                color="grey", label=f"best-of-n (SFT + reward model; {cfg.bon_prompts} prompts)")
    for r in b:
        ax.annotate(f"n={r['n']}", (r["kl"], r[y]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    for method, marker in (("sft", "*"), ("ppo", "o"), ("rloo", "^"), ("grpo", "v"), ("dpo", "s")):
        pts = [p for p in points if p["method"] == method]
        if pts:
            ax.errorbar([p["kl"] for p in pts], [p[y] for p in pts], xerr=bars(pts, "kl"), yerr=bars(pts, y),
                        fmt=marker, capsize=3, ms=8, label=method.upper())
            for p in pts if method != "sft" else ():
                ax.annotate(f"beta={p['beta']}", (p["kl"], p[y]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    seeded = max(points, key=lambda p: p.get("n_seeds", 1))
    ax.set(xlabel="KL(pi || pi_ref)  [nats per answer]", ylabel=f"{label}, {points[0]['n_prompts']} test prompts",
           title=f"reward vs KL on {cfg.task} (cf. DPO paper, fig. 2)" + (
               f"\ntrained policies: mean of {seeded['n_seeds']} seeds, bars {seeded['interval']} over them"
               if "n_seeds" in seeded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "frontier.png"), dpi=100)
    plt.close(fig)
    if y != "gold":
        return

    plot_overoptimisation(plt, folder, cfg, bon, curves, biased_runs, rms)

    if biased_runs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, (beta, rows) in enumerate(sorted(biased_runs.items())):
            c = f"C{i}"
            it = [r["iteration"] for r in rows]
            if "gold_low" in rows[-1]:  # several seeds: their mean and the interval over them
                axes[0].plot(it, [r["gold"] for r in rows], "-o", ms=3, color=c,
                             label=f"beta={beta}: gold, mean of {rows[-1]['n_seeds']} seeds "
                                   f"(band: {rows[-1]['interval']})")
                axes[0].fill_between(it, [r.get("gold_low", r["gold"]) for r in rows],
                                     [r.get("gold_high", r["gold"]) for r in rows], color=c, alpha=0.15)
            else:
                axes[0].errorbar(it, [r["gold"] for r in rows], yerr=[2 * r["gold_se"] for r in rows], fmt="-o",
                                 ms=3, capsize=2, color=c, label=f"beta={beta}: gold (+- 2 s.e.)")
            axes[0].plot(it, [r["score"] for r in rows], "--", color=c, alpha=0.7, label=f"beta={beta}: proxy")
            seeds = f", mean of {rows[-1]['n_seeds']} seeds" if "n_seeds" in rows[-1] else ""
            draw_trajectory(axes[1], sqrt_kl(rows), [r["gold"] for r in rows], c, f"beta={beta}{seeds}")  # in order
        axes[0].set(xlabel="PPO iteration", ylabel="score (log-odds)", title="against the biased reward model")
        axes[1].set(xlabel="sqrt(KL(pi || pi_ref))  [sqrt(nats)]", ylabel="gold (judge log-odds)",
                    title="gold vs sqrt(KL): one curve if beta is early stopping")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "kl_penalty.png"), dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    plain = sorted((rm for rm in rms if not rm["bias"]), key=lambda rm: rm["n"])
    for key, name, m in (("gold_accuracy", "all held-out pairs", "o"),
                         ("gold_accuracy_clear", "pairs the judge separates by >= 1 log-odds", "s"),
                         ("pool_corr", "corr(RM, gold) on the SFT answers", "^")):
        ax.plot([rm["n"] for rm in plain], [rm[key] for rm in plain], f"-{m}", label=name)
        ax.plot([rm["n"] for rm in rms if rm["bias"]], [rm[key] for rm in rms if rm["bias"]], m, mfc="none", ms=10,
                color=ax.lines[-1].get_color(), label="  biased labeller" if m == "o" else None)
    ax.set_xscale("log")
    ax.set(xlabel="train prompts (x 6 ranked pairs each)", ylabel="agreement with the judge's order / correlation",
           title="what a reward model learns from how much data")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "rm_scaling.png"), dpi=100)
    plt.close(fig)


def bars(points, key):
    """matplotlib's error bars for `key` of each point: the interval over seeds where a point has one (over_seeds),
    else its standard error over prompts (none for KL)."""
    se = lambda p: 0.0 if key == "kl" else p[f"{key}_se"]
    low = [p[key] - p[f"{key}_low"] if f"{key}_low" in p else se(p) for p in points]
    high = [p[f"{key}_high"] - p[key] if f"{key}_high" in p else se(p) for p in points]
    return [low, high]


def sqrt_kl(rows):
    """sqrt(KL) of each row (a KL estimate below zero counts as 0)."""
    return [math.sqrt(max(r["kl"], 0)) for r in rows]


def gains(rows, key, unit=1.0):
    """(sqrt(KL), gain of row[key] over the first row's, in `unit`) for each row, in the rows' order: along a PPO
    curve (ppo_curve: SFT at iteration 0 first) the path the run took, back and forth in KL where it went so."""
    return sqrt_kl(rows), [(r[key] - rows[0][key]) / unit for r in rows]


def fit_line(fit, rows, steps=50):
    """Gao et al.'s fitted form `fit` (fit_gao) where it is worth drawing: (ds, gains) on sqrt(KL) from 0 (the start,
    gain 0) to the largest sqrt(KL) of `rows`, the points it was fitted to. None where there is no fit, and for the RL
    form without a peak (beta <= 0): the form assumes the gold is a function of KL, and fitted to a PPO run whose KL
    overshoots and comes back it dips below zero at small KL and bends up, which says nothing of the run. The
    best-of-n form is drawn whatever its beta (beta <= 0: the gold keeps rising over the range, as the points do)."""
    if fit is None or (fit["form"] == "rl" and fit["beta"] <= 0):
        return None
    ds = torch.linspace(0, max(sqrt_kl(rows)), steps).tolist()
    return ds, [gao_form(d, fit["alpha"], fit["beta"], fit["form"]) for d in ds]


def fit_label(name, fit, line):
    """A reward model's legend entry on a gold panel, with why its fitted form is absent where fit_line drew none."""
    if line is not None or name == "judge":
        return name
    if fit is None:
        return f"{name} (no fit: fewer than two points with KL > 0)"
    return f"{name} (no fit drawn: beta_{fit['form']} = {fit['beta']:+.2f} <= 0, no peak)"


def draw_trajectory(ax, xs, ys, color, label, style="-"):
    """One PPO run on a panel, in iteration order: a dot per evaluation and an arrow from each to the next (a run
    whose KL comes back reads as coming back, not as a zigzag), a hollow circle at its start, a square at its end."""
    ax.plot(xs, ys, "o", ms=3, color=color, label=label)
    for a, b in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="-|>", color=color, lw=1, ls=style,
                                                         mutation_scale=9, shrinkA=0, shrinkB=2))
    ax.plot(xs[:1], ys[:1], "o", ms=8, mfc="none", color=color)
    ax.plot(xs[-1:], ys[-1:], "s", ms=6, color=color)


def plot_overoptimisation(plt, folder, cfg, bon, curves, biased_runs, rms):
    """overoptimisation.png: the gold (top) and proxy (bottom, in the proxy's SFT std) gain over the start against
    sqrt(KL), best-of-n (left: n = 1, 2, 4, ... joined) and PPO at the smallest beta (right: each run a trajectory,
    draw_trajectory), one colour per reward model, black for the judge ranking by the gold itself. Gao et al.'s
    fitted forms are dotted on the gold panels where fit_line draws them (the RL form only with a peak); the legend
    says which reward model has none, and why."""
    colour = {rm["name"]: f"C{i}" for i, rm in enumerate(rms)}
    spread = {rm["name"]: rm["sft_std"] for rm in rms}  # each proxy's std on the SFT answers: its own unit
    fits = {rm["name"]: rm["fits"] for rm in rms}
    small_beta = smallest_beta(cfg)
    rl = dict(curves, **{rm["name"]: biased_runs[small_beta] for rm in rms if rm["bias"] and small_beta in biased_runs})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex="col")
    for col, form, what, series in ((0, "bon", "best-of-n", bon), (1, "rl", f"PPO, beta={small_beta}", rl)):
        gold_ax, proxy_ax = axes[0][col], axes[1][col]
        unfitted = False  # a fit fit_line does not draw
        for name, rows in series.items():
            c = "black" if name == "judge" else colour[name]
            fit = fits.get(name, {}).get(form)
            line = fit_line(fit, rows)
            unfitted |= fit is not None and line is None
            panels = [(gold_ax, gains(rows, "gold"), "-", fit_label(name, fit, line))]
            if name != "judge":
                panels.append((proxy_ax, gains(rows, "score", spread[name]), "--", name))
            for ax, (xs, ys), style, label in panels:
                if form == "rl":
                    draw_trajectory(ax, xs, ys, c, label, style)
                else:
                    ax.plot(xs, ys, f"{style}o", ms=3, lw=1, color=c, label=label)
            if line:
                gold_ax.plot(*line, ":", color=c)
        if form == "rl":
            gold_ax.plot([], [], "o", ms=8, mfc="none", color="grey", label="start (SFT)")
            gold_ax.plot([], [], "s", ms=6, color="grey", label="end; arrows in iteration order")
            if unfitted:
                gold_ax.plot([], [], " ", label="RL form: gold as a function of KL; a run whose KL\n"
                                                "goes back fits beta_rl <= 0 (no peak): not drawn")
        fitted = "Gao et al.'s form dotted" if form == "bon" else "Gao et al.'s RL form dotted if it peaks"
        gold_ax.set(ylabel="gold gain over SFT (judge log-odds)", title=f"{what}: gold ({fitted})")
        proxy_ax.set(xlabel="sqrt(KL(pi || pi_ref))  [sqrt(nats)]", ylabel="proxy gain over SFT (its SFT std)",
                     title=f"{what}: the proxy each policy optimised")
        for ax in (gold_ax, proxy_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("over-optimisation: reward models of several sizes and a biased labeller (cf. Gao et al. 2022, "
                 "fig. 1)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "overoptimisation.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report
def peak_and_end(rows):
    """Along a PPO curve (iteration 0 = SFT): the evaluation with the highest gold, the last one, and whether the
    reward model was over-optimised: the gold fell from its peak by more than two standard errors of the difference
    (taken as independent: sqrt(se_peak^2 + se_last^2)) while the proxy did not fall (Gao et al. 2022's definition:
    optimising the proxy harder made the truth worse). A gold that falls with its proxy is not over-optimisation."""
    peak, last = max(rows, key=lambda r: r["gold"]), rows[-1]
    se = math.sqrt(peak["gold_se"] ** 2 + last["gold_se"] ** 2)
    return peak, last, peak["gold"] - last["gold"] > 2 * se and last["score"] >= peak["score"]


def print_tables(cfg, points, bon, curves, biased_runs, rms, y, biased_seeds=None):
    print(f"\nthe lab on {cfg.task}: policies on {points[0]['n_prompts']} test prompts (seed {cfg.eval_seed}); "
          f"{y} +- standard error:")
    print(f"  {'method':10s} {'beta':>6s} {'KL':>7s} {y + ' (se)':>18s} {'proxy (se)':>18s}")
    for p in points:
        positive = f"  positive {p['positive']:.2f}" if "positive" in p else ""
        seeds = f"  over {p['n_seeds']} seeds: {y} [{p[f'{y}_low']:+.3f}, {p[f'{y}_high']:+.3f}] KL " \
            f"[{p['kl_low']:.2f}, {p['kl_high']:.2f}]" if "n_seeds" in p else ""
        print(f"  {p['method']:10s} {p['beta']:>6g} {p['kl']:7.2f} {p[y]:+9.3f} ({p[f'{y}_se']:.3f})"
              f" {p['score']:+9.3f} ({p['score_se']:.3f}){positive}{seeds}")
    print(f"\nbest-of-n from one pool of {cfg.bon_pool} SFT answers to each of {cfg.bon_prompts} test prompts; "
          f"{y} of the reward model's favourite (proxy in brackets):")
    ns = [r["n"] for r in bon[rms[0]["name"]]]
    print(f"  {'ranker':12s}" + "".join(f" {'n=' + str(n):>14s}" for n in ns))
    for name, rows in bon.items():
        print(f"  {name:12s}" + "".join(f" {r[y]:+6.2f} ({r['score']:+5.2f})" for r in rows))
    print(f"  {'KL':12s}" + "".join(f" {r['kl']:14.2f}" for r in bon[rms[0]['name']]))
    if y != "gold":
        return
    print("\nreward models (the same held-out pairs of comparisons.pt; corr(RM, gold) on the best-of-n pool):")
    print(f"  {'name':10s} {'train prompts':>13s} {'agreement':>9s} {'separated':>9s} {'own labels':>10s} {'corr':>6s}")
    for rm in rms:
        own = f"{rm['labeller_accuracy']:.3f}" if "labeller_accuracy" in rm else "="
        print(f"  {rm['name']:10s} {rm['n']:13d} {rm['gold_accuracy']:9.3f} {rm['gold_accuracy_clear']:9.3f} "
              f"{own:>10s} {rm['pool_corr']:+6.2f}")
    print("\nPPO curves (gold at the evaluation where it peaks and at the end, +- s.e.; the proxy there; "
          "over-optimised: the gold fell by > 2 s.e. while the proxy did not fall):")
    print(f"  {'reward model':12s} {'beta':>5s} {'peak gold':>15s} {'at it':>5s} {'KL':>5s} {'end gold':>15s} "
          f"{'KL':>5s} {'proxy peak -> end':>18s}  over-optimised")
    runs = [(name, smallest_beta(cfg), rows) for name, rows in curves.items()] + \
           [("rm_biased", beta, rows) for beta, rows in sorted(biased_runs.items())]
    for name, beta, rows in runs:
        peak, last, falls = peak_and_end(rows)
        seeds = (biased_seeds or {}).get(beta, []) if name == "rm_biased" else []
        count = f" (mean of {len(seeds)} seeds; each seed: {sum(peak_and_end(c)[2] for c in seeds)} of {len(seeds)})" \
            if len(seeds) > 1 else ""
        print(f"  {name:12s} {beta:5g} {peak['gold']:+7.2f} +- {peak['gold_se']:.2f} {peak['iteration']:5d} "
              f"{peak['kl']:5.1f} {last['gold']:+7.2f} +- {last['gold_se']:.2f} {last['kl']:5.1f} "
              f"{peak['score']:+8.2f} -> {last['score']:+6.2f}  {'YES' if falls else 'no'}{count}")
    print("\nGao et al.'s forms fitted to the gold gain over SFT, d = sqrt(KL): best-of-n d (alpha - beta d), "
          "RL d (alpha - beta log d):")
    for rm in rms:
        for form, fit in rm["fits"].items():
            peak = f"peak at KL {fit['peak_kl']:.1f} (gain {fit['peak_gain']:+.2f})" if fit["peak_kl"] else "no peak"
            print(f"  {rm['name']:10s} {form:3s} alpha {fit['alpha']:+.3f} beta {fit['beta']:+.3f}  {peak}")


def run_sweep(cfg, rms):
    """Every training run of the lab (each kept if it finished), in this order: PPO at ppo_betas, the critic-free
    estimators and DPO at dpo_betas against rm.pt (the frontier's points), PPO against every other reward model at the
    smallest beta, or at bias_betas for the biased one; the frontier's and the biased runs at each of the cfg.seeds
    training seeds, the others at one. Returns (the frontier's points, over_seeds each; {rm name: PPO folder at the
    smallest beta}; {beta: PPO folders against the biased reward model, one a seed})."""
    small_beta, seeds = smallest_beta(cfg), [cfg.seed + i for i in range(cfg.seeds)]
    plan = [("ppo", beta, cfg.ppo_args, None, beta == small_beta) for beta in sorted(floats(cfg.ppo_betas))]
    plan += [(e, cfg.critic_free_beta, cfg.ppo_args, None, False) for e in cfg.critic_free.split(",") if e]
    plan += [("dpo", beta, cfg.dpo_args, None, False) for beta in sorted(floats(cfg.dpo_betas))]
    plan += [("ppo", beta, cfg.ppo_args, rm, True) for rm in rms[1:]
             for beta in (floats(cfg.bias_betas) if rm["bias"] else [small_beta])]
    seeded = lambda rm: rm is None or rm["bias"]
    jobs = [(k, seed) for k, job in enumerate(plan) for seed in (seeds if seeded(job[3]) else seeds[:1])]
    done = [[] for _ in plan]  # (point, folder) of each seed, per entry of the plan
    for i, (k, seed) in enumerate(jobs):
        method, beta, extra, rm, curve = plan[k]
        done[k].append(run(method, beta, cfg, extra, rm, seed, curve, progress=f"run {i + 1} of {len(jobs)}"))
    points, curve_folders, biased_folders = [], {}, {}
    for (method, beta, extra, rm, curve), runs in zip(plan, done):
        if rm is None:
            points.append(over_seeds([p for p, _ in runs]))
            if curve:
                curve_folders[rms[0]["name"]] = runs[0][1]
        elif rm["bias"]:  # every seed: the kl_penalty chart's curves and over-optimisation's count
            biased_folders[beta] = [f for _, f in runs]
        else:  # the over-optimisation curve at the smallest beta, one seed
            curve_folders[rm["name"]] = runs[0][1]
    return points, curve_folders, biased_folders


def score_under_every_reward_model(cfg, rt, task, rms):
    """The SFT policy's answers to the evaluation prompts and best-of-n from one pool (answer_pool), each scored by
    every reward model; with a judge, each reward model's agreement (added to its dict with its correlation with the
    judge on the pool and its std on it). Returns (bon: rm name -> best_of_n_curve rows, and "judge" ranking by the
    gold itself; sft_points: rm name -> the SFT policy's summary under that reward model, at KL 0)."""
    sft, judge = evaluate.load_model(os.path.join(cfg.out_dir, "sft.pt"), rt), task.judge
    prompts = evaluate.eval_prompts(task.prompts_test, cfg)
    sft_answers = evaluate.sample_and_score(sft, None, None, prompts, rt, cfg.eval_batch_size, cfg.max_new_tokens,
                                            seed=cfg.eval_seed, judge=judge)
    pool = answer_pool(cfg, rt, sft, judge, prompts[:cfg.bon_prompts])
    test = data.load_rankings(cfg, task)[1] if judge is not None else None
    bon, sft_points = {}, {}
    for rm in rms:
        model = evaluate.load_model(rm["path"], rt, scalar_head=True)
        key = f"{rm['name']}:{os.path.getmtime(rm['path'])}"
        if key not in pool["scores"]:
            pool["scores"][key] = reward.score_answers(model, pool["examples"], rt, cfg.eval_batch_size).view(
                len(pool["examples"]) // cfg.bon_pool, -1)  # (P, N)
            save_pool(os.path.join(cfg.out_dir, "lab", "pool.pt"), pool)
        bon[rm["name"]] = evaluate.best_of_n_curve(pool["scores"][key], pool["gold"])
        sft_points[rm["name"]] = dict(evaluate.summarize(dict(sft_answers, scores=reward.score_answers(
            model, [dict(prompt=p["prompt"], chosen=a) for p, a in zip(prompts, sft_answers["responses"])], rt,
            cfg.eval_batch_size))), kl=0.0, kl_se=0.0, n_prompts=len(prompts))
        if judge is not None:
            rm.update(agreement(rm, model, test, cfg, rt), pool_corr=torch.corrcoef(torch.stack(
                [pool["scores"][key].flatten(), pool["gold"].flatten()]))[0, 1].item(), fits={},
                      sft_std=pool["scores"][key].std().item())
    if judge is not None:
        bon["judge"] = evaluate.best_of_n_curve(pool["gold"], pool["gold"])  # the judge as its own ranker: the ceiling
    return bon, sft_points


def fit_forms(rms, bon, curves, biased_runs, small_beta):
    """Gao et al.'s forms per reward model (rm["fits"]["bon" / "rl"]), fitted to the gold gain over the start of its
    best-of-n curve and of its PPO curve at the smallest beta (where there are two points with KL > 0)."""
    for rm in rms:
        for form, rows in (("bon", bon[rm["name"]]),
                           ("rl", curves.get(rm["name"]) or (biased_runs.get(small_beta) if rm["bias"] else None))):
            if rows and sum(r["kl"] > 0 for r in rows) >= 2:
                rm["fits"][form] = fit_gao([r["kl"] for r in rows], [r["gold"] - rows[0]["gold"] for r in rows], form)


def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    make_missing_checkpoints(cfg, "sft", "rm")  # sft.py, reward.py first, where their checkpoints are missing
    rt = common.setup_runtime(cfg)
    task = data.load_task(cfg, verbose=False)
    judge, small_beta = task.judge, smallest_beta(cfg)
    rms = reward_models(cfg) if judge is not None else [dict(name="rm", path=os.path.join(cfg.out_dir, "rm.pt"),
                                                             n=0, bias=0.0, default=True)]
    points, curve_folders, biased_folders = run_sweep(cfg, rms)
    bon, sft_points = score_under_every_reward_model(cfg, rt, task, rms)
    default = sft_points[rms[0]["name"]]
    points = [dict(method="sft", beta=0.0, **default)] + points
    points = [dict(p, rm=rms[0]["name"], n_prompts=default["n_prompts"]) for p in points]
    curves = {name: ppo_curve(f, sft_points[name]) for name, f in curve_folders.items()}
    biased = next((rm for rm in rms if rm["bias"]), None)
    biased_seeds = {beta: [ppo_curve(f, sft_points[biased["name"]]) for f in fs] for beta, fs in biased_folders.items()}
    biased_runs = {beta: [over_seeds(rows) for rows in zip(*curves)] for beta, curves in biased_seeds.items()}
    if judge is not None:
        fit_forms(rms, bon, curves, biased_runs, small_beta)
    rows = points + [dict(method="best-of-n", rm=name, **r) for name, rs in bon.items() for r in rs]
    rows += [dict(method="ppo-curve", rm=name, beta=small_beta, **r) for name, rs in curves.items() for r in rs]
    rows += [dict(method="ppo-curve", rm=biased["name"], beta=beta, **r)
             for beta, rs in biased_runs.items() for r in rs]
    rows += [dict(method="reward-model", rm=rm["name"], **{k: v for k, v in rm.items()
                                                          if k not in ("name", "path", "default")})
             for rm in rms if judge is not None]
    with open(os.path.join(cfg.out_dir, "lab", "points.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    y = "gold" if judge is not None else "score"
    plot(cfg, points, bon, curves, biased_runs, rms, y)
    print_tables(cfg, points, bon, curves, biased_runs, rms, y, biased_seeds)
    charts = "frontier.png" + (", overoptimisation.png, kl_penalty.png, rm_scaling.png" if judge is not None else "")
    print(f"wrote {cfg.out_dir}/lab/{charts}, points.jsonl")
    common.cleanup(rt)
    return dict(points=points, best_of_n=bon, curves=curves, biased_runs=biased_runs, reward_models=rms)


if __name__ == "__main__":
    common.cli(main)
