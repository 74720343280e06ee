"""
The evaluation that PPO, DPO and the frontier chart share: sample answers to `test` prompts, score them
with the reward model, measure the KL to the reference, and compare two policies by win rate.

    python evaluate.py                 # evaluate every checkpoint in out/ (sft, ppo, dpo), draw out/frontier.png

A policy's point on the chart is (KL(pi || pi_ref), mean reward-model score), as in the DPO paper's figure 2
(Rafailov et al. 2023). KL is estimated on the samples themselves: sum over response tokens of
log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) (the k1 estimator), averaged over prompts. Each
policy answers the same prompts with the same random seed, so two policies are compared on equal terms.
"""
import json
import os

import torch

import data
from model import load_checkpoint, model_from_checkpoint

STAGES = ("sft", "ppo", "dpo")  # the policies the frontier chart knows, in pipeline order


@torch.no_grad()
def sample_and_score(policy, reference, reward_model, prompts, rt, batch_size=16, max_new_tokens=64,
                     temperature=1.0, seed=0):
    """Answer each prompt once with `policy`; score the answer and measure its KL to `reference`.

    Args:
        policy, reference: GPT language models (same tokenizer); reward_model: GPT with a scalar head.
        prompts: list of examples (dicts with a "prompt" token list), e.g. data `test` examples.
        rt: common.Runtime (device and autocast).
        max_new_tokens, temperature: sampling settings; logprobs use the same temperature.
        seed: seeds the sampler, so every policy sees the same random numbers.
    Returns:
        dict of CPU tensors, one entry per prompt: "scores" (N,) reward-model score at the last response
        token, "kl" (N,) sequence KL estimate in nats, "lengths" (N,) response tokens, "eos" (N,) 1 if the
        answer ended with EOS; and "responses": list of N token lists (through EOS).
    """
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    out = {"scores": [], "kl": [], "lengths": [], "eos": [], "responses": []}
    for i in range(0, len(prompts), batch_size):
        batch = data.collate_prompts(prompts[i:i + batch_size])
        prompt_idx = batch["idx"].to(rt.device)                         # (B, P) left-padded
        prompt_mask = batch["attention_mask"].to(rt.device)             # (B, P)
        with rt.autocast():
            tokens, response_mask = policy.generate(prompt_idx, prompt_mask, max_new_tokens,
                                                    temperature=temperature, generator=gen)  # (B, R) x2
        idx = torch.cat([prompt_idx, tokens], 1)                        # (B, P+R)
        mask = torch.cat([prompt_mask, response_mask], 1)               # (B, P+R)
        target = torch.cat([torch.zeros_like(prompt_mask), response_mask], 1)
        with rt.autocast():
            logp = policy.logprobs(idx, mask, target, temperature=temperature)
            ref_logp = reference.logprobs(idx, mask, target, temperature=temperature)
            scores = reward_model.score(idx, mask)                      # (B,)
        out["scores"].append(scores.float().cpu())
        out["kl"].append(((logp - ref_logp) * target).sum(1).float().cpu())  # k1, summed over the response
        lengths = response_mask.sum(1).long()
        out["lengths"].append(lengths.cpu())
        last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
        out["eos"].append(((last == data.EOT) & (lengths > 0)).float().cpu())
        out["responses"] += [t[:n].tolist() for t, n in zip(tokens.cpu(), lengths.cpu())]
    return {k: (v if k == "responses" else torch.cat(v)) for k, v in out.items()}


def win_rate(scores_a, scores_b):
    """P(a beats b) under the reward model on the same prompts: mean of 1[a > b] + 0.5 * 1[a == b]."""
    return ((scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()).mean().item()


def summarize(result):
    """The figures a report prints for one policy: mean score, KL, length, EOS rate."""
    return {"score": result["scores"].mean().item(), "kl": result["kl"].mean().item(),
            "length": result["lengths"].float().mean().item(), "eos_rate": result["eos"].mean().item()}


def save_point(out_dir, stage, summary):
    """Write out/eval_<stage>.json, the point the frontier chart draws for that policy."""
    with open(os.path.join(out_dir, f"eval_{stage}.json"), "w") as f:
        json.dump(summary, f, indent=1)


def plot_frontier(out_dir):
    """Draw out/frontier.png: reward-model score against KL(pi || pi_ref), one point per evaluated policy
    (the out/eval_<stage>.json files written by the PPO and DPO reports). Returns the png path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for stage in STAGES:
        path = os.path.join(out_dir, f"eval_{stage}.json")
        if os.path.exists(path):
            p = json.load(open(path))
            ax.scatter([p["kl"]], [p["score"]], s=60, label=f"{stage}")
            ax.annotate(stage, (p["kl"], p["score"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("KL(pi || pi_ref)  [nats per response]")
    ax.set_ylabel("reward-model score on test prompts")
    ax.set_title("reward vs KL (cf. DPO paper, fig. 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "frontier.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def load_models(out_dir, rt, stages=STAGES):
    """Load the reference (out/sft.pt), the reward model (out/rm.pt) and every policy checkpoint that
    exists among `stages`, in eval mode on rt.device. Raises FileNotFoundError (naming the command that
    makes it) when sft.pt or rm.pt is missing."""
    def load(name, hint, **kw):
        ckpt = load_checkpoint(os.path.join(out_dir, f"{name}.pt"), hint=hint)
        return model_from_checkpoint(ckpt, **kw).to(rt.device).eval(), ckpt
    reference, ref_ckpt = load("sft", "run `python sft.py` first")
    reward_model, _ = load("rm", "run `python reward.py` first", scalar_head=True)
    policies = {s: load(s, "")[0] for s in stages if os.path.exists(os.path.join(out_dir, f"{s}.pt"))}
    return reference, reward_model, policies, ref_ckpt


if __name__ == "__main__":
    from common import parse_config, setup_runtime
    cfg = parse_config(dict(out_dir="out", data_dir="", device="auto", dtype="auto", seed=0, n_prompts=64,
                            batch_size=16, max_new_tokens=64, temperature=1.0))
    rt = setup_runtime(cfg)
    reference, reward_model, policies, ref_ckpt = load_models(cfg.out_dir, rt)
    dcfg = ref_ckpt["config"]
    test = data.load_hh_rlhf(cfg.data_dir or None, block_size=dcfg["block_size"],
                             max_prompt_len=dcfg["max_prompt_len"])["test"][:cfg.n_prompts]
    results = {}
    for stage, policy in policies.items():
        results[stage] = sample_and_score(policy, reference, reward_model, test, rt, cfg.batch_size,
                                          cfg.max_new_tokens, cfg.temperature, cfg.seed)
        save_point(cfg.out_dir, stage, summarize(results[stage]))
        print(f"{stage:4s} " + "  ".join(f"{k} {v:.3f}" for k, v in summarize(results[stage]).items()))
    for stage in results:
        if stage != "sft" and "sft" in results:
            print(f"win rate of {stage} over sft: {win_rate(results[stage]['scores'], results['sft']['scores']):.3f}")
    print("wrote", plot_frontier(cfg.out_dir))
