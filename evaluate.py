"""
The evaluation every report shares: answer the evaluation prompts, score the answers with the reward model,
measure their KL to the reference, compare two policies by win rate, best-of-n from one pool of answers, and draw
the reward-versus-KL chart.

    python evaluate.py       # evaluate every policy checkpoint in out/<task>/ (sft, ppo, dpo), draw frontier.png

The evaluation set is one for every point of the chart: the first `eval_prompts` test prompts, answered at
temperature 1 with the sampler seeded by `eval_seed` (both in common.SHARED), so SFT, PPO and DPO are compared on
the same prompts with the same random numbers. Each point is saved with these settings, and the chart draws only
the points that share the newest point's settings.

A policy's point on the chart is (KL(pi || pi_ref), mean gold score) on the imdb task, whose gold judge is the
truth every reward model stands in for, and (KL, mean reward-model score) on hh, as in the DPO paper's figure 2
(Rafailov et al. 2023). KL is estimated on the samples themselves: the sum over response tokens of
log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) (the k1 estimator), averaged over prompts.
"""
import json
import math
import os

import torch
from tqdm import tqdm

import common
import data
from checkpoint import load_checkpoint, model_from_checkpoint
from model import sample_answers
from speed import generate_fn

STAGES = ("sft", "ppo", "dpo")  # the policies the frontier chart knows, in pipeline order
TEMPERATURE = 1.0  # evaluations sample the policy as it is


def eval_prompts(test, cfg):
    """The evaluation set: the first cfg.eval_prompts test examples (all if 0), in the data's fixed order."""
    return test[:cfg.eval_prompts] if cfg.eval_prompts > 0 else test


def eval_settings(prompts, cfg):
    """What makes two evaluations comparable; saved with every point of the chart."""
    return dict(n_prompts=len(prompts), seed=cfg.eval_seed, max_new_tokens=cfg.max_new_tokens, temperature=TEMPERATURE)


def generate_answers(policy, prompts, rt, max_new_tokens, temperature=TEMPERATURE, seed=0, batch_size=32, desc=None):
    """Answers of `policy` to `prompts` (examples with a "prompt" token list), batch_size at a time, the sampler
    seeded once with `seed` (temperature 0 = greedy): sample_and_score with nothing to score. Returns a list of N
    token lists, each answer through its EOS (if it has one). desc: show a progress bar with this label."""
    return sample_and_score(policy, None, None, prompts, rt, batch_size, max_new_tokens, temperature, seed,
                            desc=desc)["responses"]


def answers_text(policy, prompts, rt, max_new_tokens, temperature=TEMPERATURE, seed=0):
    """Decoded answers (text without <|endoftext|>) of `policy` to `prompts`: what reports print."""
    return [data.decode(t, policy.config.n_tokens)
            for t in generate_answers(policy, prompts, rt, max_new_tokens, temperature, seed)]


@torch.no_grad()
def sample_and_score(policy, reference, reward_model, prompts, rt, batch_size=16, max_new_tokens=64,
                     temperature=TEMPERATURE, seed=0, judge=None, desc=None):
    """Answer each prompt once with `policy`; score the answer with the reward model (the proxy) and, where the task
    has one, the gold judge; measure its KL to `reference`.

    Args:
        policy, reference: GPT language models (same tokenizer); reward_model: GPT with a scalar head. reference
            or reward_model may be None (no KL, no proxy score: e.g. the SFT report, before a reward model exists).
        prompts: list of examples (dicts with a "prompt" token list), e.g. eval_prompts(test, cfg).
        rt: common.Runtime (device and autocast).
        max_new_tokens, temperature: sampling settings; logprobs use the same temperature.
        seed: seeds the sampler, so every policy sees the same random numbers.
        judge: the task's gold judge (data.judge.GoldJudge) or None.
        desc: show a tqdm progress bar over the batches with this label (None: no bar).
    Returns:
        dict of CPU tensors, one entry per prompt: "scores" (N,) reward-model score at the last response token,
        "gold" (N,) the judge's log-odds of positive for prompt + answer, "kl" (N,) sequence KL estimate in nats,
        "lengths" (N,) response tokens, "eos" (N,) 1 if the answer ended with EOS ("scores", "gold", "kl" only
        when their model is given); and "responses": list of N token lists (through EOS).
    """
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    out = {"scores": [], "kl": [], "lengths": [], "eos": [], "responses": []}
    models = [m for m in (policy, reference, reward_model) if m is not None]
    with common.eval_mode(*models):
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, dynamic_ncols=True):
            batch = common.to_device(data.collate_prompts(prompts[i:i + batch_size]), rt)
            prompt_idx, prompt_mask = batch["idx"], batch["attention_mask"]  # (B, P) left-padded
            with rt.autocast():
                s = sample_answers(policy, prompt_idx, prompt_mask, max_new_tokens, temperature, gen,
                                   generate=generate_fn(policy, rt))
            idx, mask, target_mask = s["idx"], s["attention_mask"], s["target_mask"]  # (B, P+R) x3
            with rt.autocast():
                if reference is not None:  # k1, summed over the response
                    kl = (policy.logprobs(idx, mask, target_mask, temperature)
                          - reference.logprobs(idx, mask, target_mask, temperature))  # (B, P+R)
                    out["kl"].append((kl * target_mask).sum(1).float().cpu())
                if reward_model is not None:
                    out["scores"].append(reward_model.score(idx, mask).float().cpu())  # (B,)
            lengths = s["response_mask"].sum(1).long()  # (B,) through the EOS
            out["lengths"].append(lengths.cpu())
            out["eos"].append(s["has_eos"].cpu())
            out["responses"] += [t[:n].tolist() for t, n in zip(s["response"].cpu(), lengths.cpu())]
    out = {k: (v if k == "responses" else torch.cat(v)) for k, v in out.items() if len(v) or k == "responses"}
    if judge is not None:
        out["gold"] = data.gold_scores(judge, [p["prompt"] for p in prompts], out["responses"], policy.config.n_tokens)
    return out


def win_rate(scores_a, scores_b):
    """P(a beats b) over paired entries: mean of 1[a > b] + 0.5 * 1[a == b] (a tie counts one half).
    scores_a, scores_b (N,) float. Also the pairwise accuracy of a reward model: a = chosen, b = rejected."""
    return ((scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()).mean().item()


def distinct_n(responses, n=2):
    """Distinct-n (Li et al. 2016): the number of distinct n-grams of tokens over all the responses divided by the
    number of n-grams, in [0, 1]. A policy that collapses into one phrase scores near 0. responses: token lists."""
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def summarize(result):
    """The figures a report prints for one policy, means over the prompts: proxy (reward-model) score and gold score
    (log-odds) with their standard errors, the fraction the judge finds positive, KL, length, EOS rate and the
    distinct-2 of the answers, and the correlation of the reward model's and the judge's scores of them (each where
    the result has it)."""
    out = {}
    for key in ("scores", "gold", "kl"):
        if key in result:
            x = result[key].float()
            name = {"scores": "score", "gold": "gold", "kl": "kl"}[key]
            out[name] = x.mean().item()
            out[f"{name}_se"] = x.std().item() / len(x) ** 0.5 if len(x) > 1 else 0.0
    if "gold" in result:
        out["positive"] = (result["gold"] > 0).float().mean().item()
    if "gold" in result and "scores" in result and len(result["gold"]) > 1:  # does the proxy still track the truth?
        pair = torch.stack([result["scores"].float(), result["gold"].float()])  # (2, N)
        out["rm_gold_corr"] = torch.corrcoef(pair)[0, 1].item()  # Pearson's r
    if "lengths" in result:
        out.update(length=result["lengths"].float().mean().item(), eos_rate=result["eos"].mean().item())
    if "responses" in result:
        out["distinct2"] = distinct_n(result["responses"], 2)
    return out


def print_summary(name, s):
    """One line of a report for one policy (the figures of summarize)."""
    parts = [f"{name:5s}"]
    if "gold" in s:
        parts.append(f"gold {s['gold']:+.3f} +- {s['gold_se']:.3f} (positive {s['positive']:.2f})")
    if "score" in s:
        parts.append(f"RM score {s['score']:+.3f} +- {s['score_se']:.3f}")
    if "kl" in s:
        parts.append(f"KL {s['kl']:6.2f} nats")
    parts.append(f"length {s['length']:5.1f}  EOS rate {s['eos_rate']:.2f}")
    if "distinct2" in s:
        parts.append(f"distinct-2 {s['distinct2']:.2f}")
    if "rm_gold_corr" in s:
        parts.append(f"corr(RM, gold) {s['rm_gold_corr']:+.2f}")
    print("  " + "  ".join(parts))


def best_of_n_kl(n):
    """KL(best-of-n || base) in nats when the n samples are distinct: log n - (n - 1) / n (Stiennon et al. 2020,
    appendix; an upper bound in general). n >= 1 -> float (0 for n = 1)."""
    return math.log(n) - (n - 1) / n


def best_of_n_from_pool(proxy, values, n):
    """The expected `values` of the answer the proxy ranks best among n drawn without replacement from a pool of N
    answers per prompt, computed exactly from the one pool (Gao et al. 2022, appendix; Nakano et al. 2021):
        E[f(best of n)] = sum_{i=n}^{N} f_(i) C(i-1, n-1) / C(N, n)
    with the pool sorted by proxy ascending (f_(i) = the value of the i-th lowest-ranked answer): the best of a
    random n-subset is the i-th answer when it is in the subset and the other n-1 come from the i-1 below it.
    Ties in the proxy go to the answer sampled later (a stable sort keeps pool order among equals).
    proxy, values (P, N) float; 1 <= n <= N. Returns (P,) float64, per prompt. Raises ValueError for n outside."""
    P, N = proxy.shape
    if not 1 <= n <= N:
        raise ValueError(f"best_of_n_from_pool: n={n} for a pool of {N} answers per prompt")
    order = proxy.argsort(dim=1, stable=True)  # (P, N) ascending
    sorted_values = values.double().gather(1, order)  # (P, N) f_(1), ..., f_(N)
    i = torch.arange(n, N + 1, dtype=torch.float64)  # 1-based ranks that can be the best of n
    log_c = (i.lgamma() - math.lgamma(n) - (i - n + 1).lgamma()  # log C(i-1, n-1)
             - (math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)))  # - log C(N, n)
    return sorted_values[:, n - 1:] @ log_c.exp()  # (P,); the weights sum to 1


def best_of_n_curve(proxy, gold=None, ns=None):
    """Best-of-n for n = 1, 2, 4, ..., N (or `ns`) from one pool: proxy, gold (P, N) the reward model's and the judge's
    scores of N answers to each of P prompts (gold may be None). Returns a list of dicts, one per n: n, kl =
    best_of_n_kl(n), score (+ score_se) the expected proxy of the chosen answer and gold (+ gold_se), means over the
    prompts with standard errors over prompts."""
    N = proxy.shape[1]
    ns = ns or [2 ** k for k in range(N.bit_length()) if 2 ** k <= N]
    rows = []
    for n in ns:
        row = dict(n=n, kl=best_of_n_kl(n))
        for name, values in (("score", proxy), ("gold", gold)):
            if values is not None:
                per_prompt = best_of_n_from_pool(proxy, values, n)  # (P,)
                row[name] = per_prompt.mean().item()
                row[f"{name}_se"] = per_prompt.std().item() / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else 0.0
        rows.append(row)
    return rows


INTERVAL_NAMES = dict(range="min-max", bootstrap="95% bootstrap", none="none")  # seed_interval's `how`, in words


def seed_interval(values, resamples=10000):
    """The mean over training seeds of one figure, with a 95% interval over the seeds (RL results move with the seed:
    Henderson et al. 2018; report intervals over runs: Agarwal et al. 2021). values: floats, one per seed (nan for
    a run that diverged is dropped). Fewer than 5 seeds: the range (min, max), said as "range"; 5 or more: a
    percentile bootstrap of the mean ("bootstrap", resamples draws of n seeds with replacement, generator seed 0).
    Returns dict mean, low, high, n, how; mean None when no value is left (INTERVAL_NAMES says `how` in words)."""
    x = torch.tensor([v for v in values if v == v], dtype=torch.float64)  # v == v drops nan
    if len(x) == 0:
        return dict(mean=None, low=None, high=None, n=0, how="none")
    if len(x) < 5:
        return dict(mean=x.mean().item(), low=x.min().item(), high=x.max().item(), n=len(x), how="range")
    draws = x[torch.randint(len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(0))].mean(1)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return dict(mean=x.mean().item(), low=low, high=high, n=len(x), how="bootstrap")


def order(a, b):
    """+1 if interval a (seed_interval) lies wholly above b, -1 wholly below, 0 where they overlap: not separable."""
    if a["mean"] is None or b["mean"] is None:
        return 0
    return 1 if a["low"] > b["high"] else -1 if a["high"] < b["low"] else 0


def save_point(out_dir, stage, summary, settings):
    """Write out/eval_<stage>.json, the point the frontier chart draws for that policy, with its eval settings."""
    with open(os.path.join(out_dir, f"eval_{stage}.json"), "w") as f:
        json.dump(dict(summary, eval=settings), f, indent=1)


def compare(name, policy, reference, reward_model, prompts, rt, cfg, judge=None, n_show=3):
    """The report of a trained policy against SFT (the reference), shared by ppo.py and dpo.py: both answer the
    same `prompts` with the same sampler seed; print the proxy (reward-model) score, the gold score where the task
    has a judge, KL, length, EOS rate, the win rates of `name` over SFT, and a few answers side by side; write
    out/eval_sft.json, out/eval_<name>.json and out/frontier.png. Returns {"sft": summary, name: summary,
    "win_rate": under the reward model, "gold_win_rate": under the judge (if any), "n_prompts": int}."""
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed, judge=judge)
    results = {"sft": sample_and_score(reference, reference, reward_model, prompts, rt, **kw),
               name: sample_and_score(policy, reference, reward_model, prompts, rt, **kw)}
    settings = eval_settings(prompts, cfg)
    report = {stage: summarize(r) for stage, r in results.items()}
    for stage, summary in report.items():
        save_point(cfg.out_dir, stage, summary, settings)
    report.update(win_rate=win_rate(results[name]["scores"], results["sft"]["scores"]), n_prompts=len(prompts))
    if judge is not None:
        report["gold_win_rate"] = win_rate(results[name]["gold"], results["sft"]["gold"])
    print(f"\n{name.upper()} vs SFT on the first {len(prompts)} test prompts (sampler seed {cfg.eval_seed}, "
          f"temperature {TEMPERATURE}, up to {cfg.max_new_tokens} tokens; the same for every point of the chart):")
    for stage in ("sft", name):
        print_summary(stage, report[stage])
    print(f"  win rate of {name.upper()} over SFT (ties count 1/2): {report['win_rate']:.3f} under the reward model"
          + (f", {report['gold_win_rate']:.3f} under the gold judge" if judge is not None else ""))
    V = policy.config.n_tokens
    for i in range(min(n_show, len(prompts))):
        print(f"  PROMPT ...{data.decode(prompts[i]['prompt'], V)[-100:]!r}")
        for stage in ("sft", name):
            gold = f" (gold {results[stage]['gold'][i]:+.2f})" if judge is not None else ""
            print(f"    {stage:4s}{gold} {data.decode(results[stage]['responses'][i], V)[:200]!r}")
    print("  wrote", plot_frontier(cfg.out_dir))
    return report


def plot_frontier(out_dir):
    """Draw out/frontier.png: the gold score where the task has a judge, else the reward-model score (+- standard
    error) against KL(pi || pi_ref), one point per
    out/eval_<stage>.json whose eval settings match those of the newest such file (older points of another
    evaluation set are left out and named). Returns the png path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [os.path.join(out_dir, f"eval_{s}.json") for s in STAGES]
    paths = sorted((p for p in paths if os.path.exists(p)), key=os.path.getmtime)
    points = {p: json.load(open(p)) for p in paths}
    settings = points[paths[-1]].get("eval") if paths else None
    fig, ax = plt.subplots(figsize=(5, 4))
    for path, p in points.items():
        stage = os.path.basename(path)[5:-5]
        if p.get("eval") != settings:
            print(f"  frontier: {path} left out (evaluated on other settings {p.get('eval')}; rerun its stage)")
            continue
        y = "gold" if "gold" in p else "score"  # the truth where the task has a judge, else the reward model
        ax.errorbar([p["kl"]], [p[y]], yerr=[p.get(f"{y}_se", 0.0)], fmt="o", capsize=3, label=stage)
        ax.annotate(stage, (p["kl"], p[y]), textcoords="offset points", xytext=(6, 4))
        ax.set_ylabel("gold score (judge log-odds) on test prompts" if y == "gold" else
                      "reward-model score on test prompts")
    ax.set_xlabel("KL(pi || pi_ref)  [nats per response]")
    ax.set_title("reward vs KL (cf. DPO paper, fig. 2)")
    ax.grid(alpha=0.3)
    if points:
        ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "frontier.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def load_model(path, rt, stage=None, vocab_size=None, scalar_head=None):
    """The GPT of checkpoint `path` in eval mode on rt.device (checkpoint.load_checkpoint checks the stage and the
    vocabulary where given; scalar_head as in checkpoint.model_from_checkpoint). Raises UserError as they do."""
    ckpt = load_checkpoint(path, stage=stage, vocab_size=vocab_size)
    return model_from_checkpoint(ckpt, scalar_head=scalar_head).to(rt.device).eval()


def load_models(out_dir, rt, stages=STAGES, vocab_size=None):
    """Load the reference (out/sft.pt), the reward model (out/rm.pt) and every policy checkpoint that exists
    among `stages`, in eval mode on rt.device. Raises UserError (naming the command that writes it) when
    sft.pt or rm.pt is missing or damaged, or of a vocabulary other than vocab_size (None: any)."""
    load = lambda name, stage, **kw: load_model(os.path.join(out_dir, f"{name}.pt"), rt, stage, vocab_size, **kw)
    reference, reward_model = load("sft", "sft"), load("rm", "rm", scalar_head=True)
    policies = {s: load(s, s) for s in stages if os.path.exists(os.path.join(out_dir, f"{s}.pt"))}
    return reference, reward_model, policies


def main(argv=None):
    keys = ("task", "out_dir", "data_dir", "device", "dtype", "seed", "vocab_size", "block_size", "max_prompt_len",
            "max_new_tokens",
            "eval_prompts", "eval_seed", "eval_batch_size")
    cfg = common.parse_config({k: common.SHARED[k] for k in keys}, argv)
    rt = common.setup_runtime(cfg)
    reference, reward_model, policies = load_models(cfg.out_dir, rt, vocab_size=cfg.vocab_size)
    task = data.load_task(cfg)
    prompts = eval_prompts(task.prompts_test, cfg)
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed, judge=task.judge)
    results = {stage: sample_and_score(policy, reference, reward_model, prompts, rt, **kw)
               for stage, policy in policies.items()}
    print(f"on the first {len(prompts)} test prompts of {cfg.task} (sampler seed {cfg.eval_seed}):")
    for stage, result in results.items():
        save_point(cfg.out_dir, stage, summarize(result), eval_settings(prompts, cfg))
        print_summary(stage, summarize(result))
        if stage != "sft":
            for key, under in (("scores", "the reward model"), ("gold", "the gold judge")):
                if key in result:
                    print(f"        win rate over sft under {under}: {win_rate(result[key], results['sft'][key]):.3f}")
    print("wrote", plot_frontier(cfg.out_dir))


if __name__ == "__main__":
    common.cli(main)
