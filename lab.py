"""
The lab: how much gold reward each method buys per nat of KL, and where a reward model starts being gamed.

    python lab.py                                          # imdb CPU preset: PPO and DPO at three betas each, RLOO,
                                                           # GRPO, best-of-n
    python lab.py --ppo_betas=0.02,0.1 --dpo_betas=0.1 --bon_max_n=16

It reuses out/<task>/sft.pt, rm.pt and (imdb) comparisons.pt (running sft.py and reward.py first if they are missing),
and runs every policy into its own folder, out/<task>/lab/<method>_beta<beta>/, so a second `python lab.py` only
runs what is missing (a finished run is kept). Then it draws two charts into out/<task>/lab/:

- frontier.png: the gold score (imdb; the reward-model score on hh) of each policy's answers to the evaluation
  prompts against KL(pi || pi_ref) per answer, with standard errors over prompts; best-of-n from the SFT policy
  (ranked by the reward model) as a line, at KL = log n - (n - 1) / n; SFT at the origin. The DPO paper's figure 2.
- overoptimisation.png: the proxy (reward-model) score and the gold score against sqrt(KL), along the PPO run with
  the smallest beta (evaluated every eval_every iterations) and along best-of-n (Gao et al. 2022). Where the proxy
  keeps rising and the gold turns down, the reward model is being gamed.

It also writes every point to out/<task>/lab/points.jsonl and prints them as a table. Every point is evaluated on
the same prompts with the same seed (common.SHARED's eval_prompts and eval_seed).
"""
import json
import math
import os

import common
import data
import dpo
import evaluate
import ppo
from checkpoint import load_checkpoint, model_from_checkpoint

config = dict(common.SHARED,
    ppo_betas="0.05,0.1,0.2",    # one PPO run per beta (the smallest one also draws the over-optimisation curve)
    dpo_betas="0.05,0.1,0.5",    # one DPO run per beta
    critic_free="rloo,grpo",     # one ppo.py run of each critic-free estimator, at critic_free_beta ("" = none) ...
    critic_free_beta=0.2,        # ... with samples_per_prompt answers to each of batch_size / samples_per_prompt
    samples_per_prompt=4,        #     prompts: as many answers per iteration as GAE's run
    ppo_args="",                 # more ppo.py flags for every PPO run, e.g. "--iterations=60 --reward=gold"
    dpo_args="",                 # more dpo.py flags for every DPO run
    eval_every=5,                # PPO iterations between the evaluations of its curve
    bon_max_n=64,                # best-of-n for n = 1, 2, 4, ..., bon_max_n
)
cuda_config = dict(common.SHARED_CUDA)


def run_folder(cfg, method, beta):
    """out/<task>/lab/<method>_beta<beta>/ with links to the shared sft.pt, rm.pt and comparisons.pt."""
    folder = os.path.join(cfg.out_dir, "lab", f"{method}_beta{beta}")
    os.makedirs(folder, exist_ok=True)
    for name in ("sft.pt", "rm.pt", "comparisons.pt"):
        src, dst = os.path.abspath(os.path.join(cfg.out_dir, name)), os.path.join(folder, name)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
    return folder


def gae_answers(cfg, extra):
    """Answers per iteration of the GAE runs: the batch_size ppo.py really uses with this lab's flags (its preset for
    the device, then the shared flags and --ppo_args), not the CPU default."""
    argv = common.shared_flags(cfg, ppo.config) + [a for a in extra.split() if a.split("=")[0][2:] in ppo.config]
    ppo_cfg = common.parse_config(ppo.config, argv, cuda_overrides=ppo.cuda_config, verbose=False)
    return ppo_cfg.batch_size * ppo_cfg.samples_per_prompt


def run(method, beta, cfg, extra):
    """One run of ppo.py (method ppo, rloo or grpo) or dpo.py at `beta` in its own folder (kept if it already
    finished); returns its point and the folder."""
    folder, stage = run_folder(cfg, method, beta), "dpo" if method == "dpo" else "ppo"
    argv = common.shared_flags(cfg) + [f"--out_dir={folder}", f"--beta={beta}"]  # the last --out_dir wins
    if stage == "ppo":
        argv.append(f"--eval_every={cfg.eval_every}")
    argv += extra.split()
    if method in ("rloo", "grpo"):  # k answers per prompt, as many answers per iteration as GAE (after `extra`, whose
        k = cfg.samples_per_prompt  # --batch_size is the GAE run's: the last flag wins)
        argv += [f"--advantage_estimator={method}", f"--samples_per_prompt={k}",
                 f"--batch_size={max(1, gae_answers(cfg, extra) // k)}"]
    path = os.path.join(folder, f"{stage}.pt")
    if not (os.path.exists(path) and load_checkpoint(path, stage=stage)["finished"]):
        print(f"\n===== {method} beta={beta} -> {folder}")
        (dpo if stage == "dpo" else ppo).main(argv)
    point = json.load(open(os.path.join(folder, f"eval_{stage}.json")))
    return dict(method=method, beta=beta, **{k: v for k, v in point.items() if k != "eval"}), folder


def ppo_curve(folder):
    """The (eval_kl, eval_score, eval_gold) points a PPO run logged every eval_every iterations."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "ppo_log.jsonl"))]
    return [dict(step=r["step"], kl=r["eval_kl"], score=r["eval_score"], gold=r.get("eval_gold"))
            for r in rows if "eval_kl" in r]


def plot(cfg, points, bon, curve, y):
    """frontier.png and overoptimisation.png (see the module docstring); y = "gold" or "score"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = os.path.join(cfg.out_dir, "lab")
    label = {"gold": "gold score (judge log-odds)", "score": "reward-model score"}[y]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar([b["kl"] for b in bon], [b[y] for b in bon], yerr=[b[f"{y}_se"] for b in bon], marker=".",
                capsize=2, color="grey", label="best-of-n (SFT + reward model)")
    for b in bon:
        ax.annotate(f"n={b['n']}", (b["kl"], b[y]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    for method, marker in (("sft", "*"), ("ppo", "o"), ("rloo", "^"), ("grpo", "v"), ("dpo", "s")):
        pts = [p for p in points if p["method"] == method]
        if pts:
            ax.errorbar([p["kl"] for p in pts], [p[y] for p in pts], yerr=[p[f"{y}_se"] for p in pts],
                        fmt=marker, capsize=3, ms=8, label=method.upper())
            for p in pts if method != "sft" else ():
                ax.annotate(f"beta={p['beta']}", (p["kl"], p[y]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("KL(pi || pi_ref)  [nats per answer]")
    ax.set_ylabel(f"{label}, {points[0]['n_prompts']} test prompts")
    ax.set_title(f"reward vs KL on {cfg.task} (cf. DPO paper, fig. 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "frontier.png"), dpi=100)
    plt.close(fig)

    keys = [("score", "proxy: reward-model score")] + ([("gold", "gold: judge log-odds")] if y == "gold" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        ax.plot([math.sqrt(max(b["kl"], 0)) for b in bon], [b[key] for b in bon], marker=".", label="best-of-n")
        ax.plot([math.sqrt(max(c["kl"], 0)) for c in curve], [c[key] for c in curve], marker="o",
                label=f"PPO, beta={curve[0]['beta']}" if curve else "PPO")
        ax.set_xlabel("sqrt(KL(pi || pi_ref))")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("over-optimisation (cf. Gao et al. 2022)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "overoptimisation.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    ppo.make_missing_checkpoints(cfg)
    rt = common.setup_runtime(cfg)
    ppo_betas, dpo_betas = ([float(b) for b in s.split(",") if b] for s in (cfg.ppo_betas, cfg.dpo_betas))
    points, curve = [], []
    for beta in sorted(ppo_betas):
        point, folder = run("ppo", beta, cfg, cfg.ppo_args)
        points.append(point)
        if not curve:  # the smallest beta: the longest way from the reference
            curve = [dict(c, beta=beta) for c in [dict(step=-1, kl=0.0, score=None, gold=None)] + ppo_curve(folder)]
    for estimator in [e for e in cfg.critic_free.split(",") if e]:
        points.append(run(estimator, cfg.critic_free_beta, cfg, cfg.ppo_args)[0])
    for beta in sorted(dpo_betas):
        points.append(run("dpo", beta, cfg, cfg.dpo_args)[0])

    # best-of-n from the SFT policy, ranked by the reward model: no training, the baseline every method must beat
    task = data.load_task(cfg, verbose=False)
    load = lambda name, **kw: model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, name)), **kw)
    sft, rm = load("sft.pt").to(rt.device), load("rm.pt", scalar_head=True).to(rt.device)
    prompts = evaluate.eval_prompts(task.prompts_test, cfg)
    bon = evaluate.best_of_n(sft, rm, prompts, rt, cfg, cfg.bon_max_n, task.judge)
    sft_point = dict(method="sft", beta=0.0, **{k: v for k, v in bon[0].items() if k not in ("n",)},
                     n_prompts=len(prompts))
    points = [sft_point] + [dict(p, n_prompts=len(prompts)) for p in points]
    if curve:
        curve[0].update(score=bon[0]["score"], gold=bon[0].get("gold"))  # the curve starts at SFT

    y = "gold" if task.judge is not None else "score"
    with open(os.path.join(cfg.out_dir, "lab", "points.jsonl"), "w") as f:
        for p in points + [dict(method="best-of-n", **b) for b in bon] + [dict(method="ppo-curve", **c) for c in curve]:
            f.write(json.dumps(p) + "\n")
    plot(cfg, points, bon, curve, y)
    print(f"\nthe lab on {cfg.task}, {len(prompts)} test prompts (seed {cfg.eval_seed}); {y} +- standard error:")
    print(f"  {'method':10s} {'beta / n':>8s} {'KL':>7s} {y + ' (se)':>18s} {'proxy (se)':>18s}")
    for p in points + [dict(method="best-of-n", beta=b["n"], **b) for b in bon]:
        positive = f"  positive {p['positive']:.2f}" if "positive" in p else ""
        print(f"  {p['method']:10s} {p['beta']:>8g} {p['kl']:7.2f} {p[y]:+9.3f} ({p[f'{y}_se']:.3f})"
              f" {p['score']:+9.3f} ({p['score_se']:.3f}){positive}")
    print(f"wrote {cfg.out_dir}/lab/frontier.png, overoptimisation.png, points.jsonl")
    common.cleanup(rt)
    return dict(points=points, best_of_n=bon, curve=curve)


if __name__ == "__main__":
    common.cli(main)
