"""
The ladder: PPO derived one rung at a time from REINFORCE, and each implementation trick switched off, every setting
trained for several seeds on the same SFT policy and reward model, so that what each step buys is measured with its
spread rather than told.

    python ladder.py                                  # 13 settings x 3 seeds of ppo.py's preset
    python ladder.py --settings=reinforce,clip,gae --seeds=5

The rungs (Williams 1992; Schulman et al. 2017; Ziegler et al. 2019; InstructGPT), each ppo.py with some flags:
  1 reinforce        A_t = R (the answer's whole return, KL penalty included), one on-policy gradient step a rollout
  2 baseline         A_t = R - mean R of the batch
  3 reward_to_go     A_t = G_t - mean R: each token is credited only with the rewards from it on
  4 is               the rollout reused for ppo_epochs x minibatches, weighted by rho = pi_theta / pi_old, unclipped
  5 klpen            + PPO's adaptive KL penalty to pi_old (the PPO paper's section 4)
  6 clip             PPO-clip instead of the penalty (the PPO paper's eq. 7)
  7 gae              + a critic (from the reward model) and GAE, advantages whitened: `python ppo.py` itself
and the tricks, each switched off (or on) alone from rung 7. Seeds are seed, seed + 1, ...: the seed moves the
rollouts and the minibatch order; the evaluation prompts and the evaluation's sampler stay fixed (eval_seed).
Runs go to out/<task>/ladder/<setting>_seed<s>/ (links to the shared sft.pt and rm.pt; nothing is re-trained that a
run does not change) and a second call runs only what is missing. Prints the table (markdown) and draws
out/<task>/ladder/ladder.png. A run counts as collapsed when its gold ends below the SFT policy's or its answers
become one phrase (distinct-2 below half of SFT's) or shrink to nothing (under half SFT's length), diverged when it
stopped on a nan.
"""
import json
import os

import common
import evaluate
import ppo
from checkpoint import load_checkpoint, make_missing_checkpoints
from lab import gae_answers, link

ONE_STEP = "--surrogate=cpi --ppo_epochs=1 --minibatch_size={batch}"  # on-policy: one gradient step a rollout
RTG = "--advantage_estimator=reward_to_go"
RUNGS = [  # name, what it adds, ppo.py flags
    ("reinforce", "1 REINFORCE: A = R", f"--advantage_estimator=reinforce {ONE_STEP}"),
    ("baseline", "2 + baseline: A = R - mean R", f"--advantage_estimator=reinforce_baseline {ONE_STEP}"),
    ("reward_to_go", "3 + reward-to-go: A_t = G_t - mean R", f"{RTG} {ONE_STEP}"),
    ("is", "4 + importance sampling: epochs x minibatches, rho A", f"{RTG} --surrogate=cpi"),
    ("klpen", "5 + adaptive KL penalty to pi_old (PPO1)", f"{RTG} --surrogate=klpen"),
    ("clip", "6 + the clip instead (PPO2)", RTG),
    ("gae", "7 + critic and GAE (the default)", ""),
]
TRICKS = [  # each from rung 7
    ("no_score_norm", "scores not normalised", "--normalize_scores=False"),
    ("no_whitening", "advantages not whitened", "--whiten_advantages=False"),
    ("no_value_clip", "value loss not clipped", "--clip_value_loss=False"),
    ("critic_from_sft", "critic from SFT + fresh head", "--critic_init=sft"),
    ("k3", "k3 instead of k1 in the reward", "--kl_estimator=k3"),
    ("ptx", "ptx on (ptx_coef 0.5)", "--ptx_coef=0.5"),
]
S = common.setting
config = dict(common.SHARED,
    seeds=S(3, ">= 1"),   # training seeds per setting: seed, seed + 1, ... (the shared `seed` is the first)
    settings="all",       # which rungs and tricks to run, comma-separated names (see above), or all
    ppo_args="",          # more ppo.py flags for every run, e.g. "--iterations=60"
)
cuda_config = dict(common.SHARED_CUDA)


def chosen_settings(cfg):
    """The (name, label, flags, kind) of cfg.settings, kind "rung" or "trick". Raises ConfigError for an unknown
    name."""
    every = [(*s, "rung") for s in RUNGS] + [(*s, "trick") for s in TRICKS]
    if cfg.settings == "all":
        return every
    names = [n for n in cfg.settings.split(",") if n]
    unknown = [n for n in names if n not in {s[0] for s in every}]
    if unknown or not names:
        raise common.ConfigError(f"--settings={cfg.settings}: unknown {', '.join(unknown) or '(none given)'}; "
                                 f"expected all or names among {', '.join(s[0] for s in every)}")
    return [s for s in every if s[0] in names]


def run_seed(cfg, name, flags, seed, batch):
    """One ppo.py run of a setting at `seed` in its own folder, kept if it finished. Returns its result: dict seed,
    final (eval_ppo.json's figures), sft (eval_sft.json's: the same for every run), curve (the rollouts' gold per
    iteration), diverged (the error, or None)."""
    folder = link(os.path.join(cfg.out_dir, "ladder", f"{name}_seed{seed}"),
                  **{f: os.path.join(cfg.out_dir, f) for f in ("sft.pt", "rm.pt")})
    path, failed = os.path.join(folder, "ppo.pt"), os.path.join(folder, "diverged.txt")
    if not os.path.exists(failed) and not (os.path.exists(path) and load_checkpoint(path, stage="ppo")["finished"]):
        argv = common.shared_flags(cfg, ppo.config) + [f"--out_dir={folder}", f"--seed={seed}"]
        try:
            ppo.main(argv + flags.format(batch=batch).split() + cfg.ppo_args.split())
        except common.Diverged as e:  # a nan: the run's result, not the study's failure
            open(failed, "w").write(str(e))
    if os.path.exists(failed):
        return dict(seed=seed, final=None, sft=None, curve=[], diverged=open(failed).read())
    curve = [json.loads(line).get("gold", float("nan")) for line in open(os.path.join(folder, "ppo_log.jsonl"))]
    point = lambda stage: json.load(open(os.path.join(folder, f"eval_{stage}.json")))
    return dict(seed=seed, final=point("ppo"), sft=point("sft"), curve=curve, diverged=None)


def summarise(runs, sft):
    """A setting's figures over its seeds (evaluate.seed_interval each): final gold, KL, gold gained per nat
    ((gold - SFT's) / KL), distinct-2, length, and the counts of diverged and collapsed runs (module docstring)."""
    done = [r["final"] for r in runs if r["final"]]
    figure = lambda f: evaluate.seed_interval([f(p) for p in done])
    collapsed = sum(p["gold"] < sft["gold"] or p["distinct2"] < 0.5 * sft["distinct2"]
                    or p["length"] < 0.5 * sft["length"] for p in done)
    return dict(gold=figure(lambda p: p["gold"]), kl=figure(lambda p: p["kl"]),
                positive=figure(lambda p: p["positive"]),
                per_nat=figure(lambda p: (p["gold"] - sft["gold"]) / p["kl"] if p["kl"] > 0.1 else float("nan")),
                distinct2=figure(lambda p: p["distinct2"]), length=figure(lambda p: p["length"]),
                diverged=sum(r["diverged"] is not None for r in runs), collapsed=collapsed, n=len(runs))


def interval_text(i, fmt="{:+.2f}"):
    """A seed_interval as 'mean [low, high]' in `fmt`, or '-' when no seed finished."""
    if i["mean"] is None:
        return "-"
    return f"{fmt.format(i['mean'])} [{fmt.format(i['low'])}, {fmt.format(i['high'])}]"


def print_table(cfg, rows, sft):
    """The markdown table: each setting's figures over its seeds, and where its gold stands against the rung before
    it (rungs) or the default (tricks): above, below, or not separable."""
    how = next((r["stats"]["gold"]["how"] for r in rows if r["stats"]["gold"]["n"]), "range")
    print(f"\nthe ladder on {cfg.task}: mean over seeds [{evaluate.INTERVAL_NAMES[how]}]; SFT "
          f"gold {sft['gold']:+.3f}, distinct-2 {sft['distinct2']:.2f}, length {sft['length']:.0f}; "
          f"{sft['eval']['n_prompts']} test prompts")
    print("| setting | gold | positive | KL (nats) | gold gained per nat | distinct-2 | length | diverged / collapsed "
          "| gold vs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    default = next((r for r in rows if r["name"] == "gae"), None)
    previous = None
    for r in rows:
        st = r["stats"]
        against = previous if r["kind"] == "rung" else default
        words = {1: "above", -1: "below", 0: f"not separable at {st['n']} seeds"}
        vs = "" if against is None or against is r else \
            f"{words[evaluate.order(st['gold'], against['stats']['gold'])]} ({against['name']})"
        print(f"| {r['label']} | {interval_text(st['gold'])} | {interval_text(st['positive'], '{:.2f}')} | "
              f"{interval_text(st['kl'], '{:.1f}')} | {interval_text(st['per_nat'], '{:+.3f}')} | "
              f"{interval_text(st['distinct2'], '{:.2f}')} | {interval_text(st['length'], '{:.0f}')} | "
              f"{st['diverged']} / {st['collapsed']} of {st['n']} | {vs} |")
        previous = r if r["kind"] == "rung" else previous


def plot(cfg, rows, sft):
    """ladder.png: gold against KL for every setting (mean over seeds, bars: the interval), the rungs joined in order;
    the rollouts' gold per iteration as bands over the seeds, rungs and tricks in a panel each. The rungs take the
    colours of a sequence (viridis, 1 dark to 7 light), the tricks those of tab10, the default black in the tricks'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rungs = [r for r in rows if r["kind"] == "rung" and r["stats"]["gold"]["mean"] is not None]
    tricks = [r for r in rows if r["kind"] == "trick" and r["stats"]["gold"]["mean"] is not None]
    colour = {r["name"]: plt.cm.viridis(i / max(1, len(rungs) - 1) * 0.9) for i, r in enumerate(rungs)}
    colour.update({r["name"]: f"C{i % 10}" for i, r in enumerate(tricks)})
    fig, axes = plt.subplots(1, 3, figsize=(18, 7))
    ax = axes[0]
    ax.plot([0], [sft["gold"]], "k*", ms=12, label="SFT (the start)")
    ax.plot([r["stats"]["kl"]["mean"] for r in rungs], [r["stats"]["gold"]["mean"] for r in rungs], "-", color="grey",
            lw=1, alpha=0.6)
    for r in rungs + tricks:
        g, k = r["stats"]["gold"], r["stats"]["kl"]
        ax.errorbar([k["mean"]], [g["mean"]], xerr=[[k["mean"] - k["low"]], [k["high"] - k["mean"]]],
                    yerr=[[g["mean"] - g["low"]], [g["high"] - g["mean"]]], fmt="o" if r["kind"] == "rung" else "s",
                    color=colour[r["name"]], capsize=3, ms=7, mfc=None if r["kind"] == "rung" else "none",
                    label=r["label"] if r["kind"] == "rung" else f"rung 7, {r['label']}")
        ax.annotate(r["label"].split()[0] if r["kind"] == "rung" else r["name"], (k["mean"], g["mean"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    how = evaluate.INTERVAL_NAMES[(rungs + tricks)[0]["stats"]["gold"]["how"]]
    ax.set(xlabel="KL(pi || pi_ref)  [nats per answer]", ylabel="gold (judge log-odds), test prompts",
           title=f"each rung and trick: mean over seeds, bars {how}")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    for ax, group, title in ((axes[1], rungs, "the rungs"), (axes[2], tricks, "the tricks, each alone from rung 7")):
        ref = [r for r in rungs if r["name"] == "gae"] if group is tricks else []
        for r in group + ref:
            curves = [c for c in r["curves"] if c]
            n = min(map(len, curves))
            cols = list(zip(*[c[:n] for c in curves]))
            c = "black" if r in ref else colour[r["name"]]
            ax.plot(range(n), [sum(v) / len(v) for v in cols], color=c, lw=1.5, label=r["label"])
            ax.fill_between(range(n), [min(v) for v in cols], [max(v) for v in cols], color=c, alpha=0.15)
        ax.set(xlabel="PPO iteration", ylabel="gold of the rollout's answers (train prompts)",
               title=f"{title}: mean (band: min-max)")
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"from REINFORCE to PPO on {cfg.task}: {rows[0]['stats']['n']} training seeds per setting, the same "
                 "SFT policy and reward model")
    fig.tight_layout()
    path = os.path.join(cfg.out_dir, "ladder", "ladder.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    settings = chosen_settings(cfg)
    if cfg.task != "imdb":
        raise common.ConfigError(f"--task={cfg.task}: the ladder measures the gold judge's score, which only imdb has")
    make_missing_checkpoints(cfg, "sft", "rm")
    batch = gae_answers(cfg, cfg.ppo_args)  # answers per rollout in ppo.py's preset: the one-step rungs' minibatch
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    total, rows, sft = len(settings) * len(seeds), [], None
    for i, (name, label, flags, kind) in enumerate(settings):
        runs = []
        for j, seed in enumerate(seeds):
            done = i * len(seeds) + j
            print(f"\n===== ladder [{'#' * (20 * done // total):20s}] run {done + 1} of {total}: {name} seed {seed}")
            runs.append(run_seed(cfg, name, flags, seed, batch))
        sft = sft or next((r["sft"] for r in runs if r["sft"]), None)
        rows.append(dict(name=name, label=label, kind=kind, runs=runs, curves=[r["curve"] for r in runs]))
    if sft is None:
        raise common.UserError("every run of the ladder diverged: no result to summarise (see diverged.txt in "
                               f"{os.path.join(cfg.out_dir, 'ladder')}/*)")
    for r in rows:
        r["stats"] = summarise(r["runs"], sft)
    with open(os.path.join(cfg.out_dir, "ladder", "ladder.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(r, runs=None)) + "\n" for r in rows)
    print_table(cfg, rows, sft)
    print(f"wrote {plot(cfg, rows, sft)}, {os.path.join(cfg.out_dir, 'ladder', 'ladder.jsonl')}")
    return rows


if __name__ == "__main__":
    common.cli(main)
