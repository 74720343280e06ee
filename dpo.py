"""
DPO: fit the SFT policy to the human comparisons directly, with no reward model and no sampling
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model").

    python dpo.py                                # CPU preset, imdb; needs out/imdb/sft.pt, comparisons.pt
    python dpo.py --loss_type=ipo --beta=0.5     # any config key: --key=value
    torchrun --nproc_per_node=2 dpo.py           # DDP (gloo on CPU, nccl on CUDA)

The policy pi_theta and the frozen reference pi_ref both start from out/<task>/sft.pt. For a prompt x with a chosen
response y_w and a rejected one y_l (imdb: every pair of the K answers per prompt that reward.py sampled and the
judge ranked, out/imdb/comparisons.pt; hh: the `train` pairs of HH-RLHF) every loss (dpo_loss) is a function of the
margin between the implicit rewards r_hat(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) of y_w and y_l (section 4):
the `sigmoid` loss is the reward model's Bradley-Terry loss with r_hat in place of r, so the policy is its own
reward model. Other losses: conservative DPO (label smoothing), IPO, hinge (SLiC / RSO).

The reference enters only through log pi_ref(y|x) of the pairs, which never change: they are computed once
before training, and the reference is freed. The training loss never samples; the report does, to put DPO
on the same reward-versus-KL chart as PPO (evaluate.py): SFT and DPO answer the same `test` prompts with the
same seed, the reward model out/rm.pt scores them (skipped if it is missing: DPO itself does not need it).
Writes out/dpo.pt (every checkpoint_every steps and at the end; `--resume=True` continues a killed run),
out/dpo_log.jsonl, out/dpo.png, out/eval_sft.json and out/eval_dpo.json (evaluated on the same prompts and seed
as every point of the chart) and out/frontier.png.
Simplifications: the policy's dropout is set to 0 (so pi = pi_ref exactly at the start, as TRL does);
`train_pairs` can cut the train pairs to a fixed random subset for a quicker run.
"""
import gc
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import evaluate
from checkpoint import (checkpoint_due, load_checkpoint, load_sft, model_from_checkpoint, resume_checkpoint,
                        save_training_state, start_training)
from common import setting
from speed import CompiledLogprobs

# ----------------------------------------------------------------------------- config
config = dict(common.SHARED, # out_dir, data_dir, device, block_size, eval_prompts, checkpoint_every, ... (common.py)
    loss_type=setting("sigmoid", "sigmoid | ipo | hinge"),  # DPO | IPO | SLiC's hinge
    beta=setting(0.1, "> 0"),  # DPO's beta: the weight of the KL constraint to the reference (higher = closer)
    label_smoothing=setting(0.0, "[0, 0.5)"),  # conservative DPO: assumed probability that a label is flipped (sigmoid)
    pairs_of_ranking=setting("all", "all | best_worst"),  # imdb's K-wise rankings as pairs: all C(K,2) of each (the
                             # reward model's data), or one per prompt, the clearest; hh has K = 2: one pair either way
    train_pairs=setting(0, ">= 0"),  # train pairs used, a fixed random subset (0 = all of `train`)
    batch_size=setting(16, ">= 1"),  # pairs per micro-batch (2 * batch_size sequences)
    grad_accum=setting(1, ">= 1"),   # micro-batches per optimiser step
    max_iters=setting(300, ">= 1"),  # optimiser steps (of batch_size x grad_accum pairs each)
    lr=setting(2e-4, ">= 0"),        # peak learning rate (AdamW, warmup then cosine to 10%)
    warmup_iters=setting(10, ">= 0"),  # linear warmup steps, then cosine decay to 10%
    weight_decay=setting(0.0, ">= 0"),  # AdamW decoupled weight decay on matrices
    grad_clip=setting(1.0, ">= 0"),  # max gradient norm (0 = off)
    log_every=setting(5, ">= 1"),  # log the mean of the train metrics over this many steps
    eval_pairs=setting(256, ">= 0"),  # test pairs for the implicit-reward accuracy (0 = all of `test`)
    eval_every=setting(25, ">= 0"),   # every this many steps log test accuracy / margin (0 = only at the end)
)
cuda_config = dict(common.SHARED_CUDA, train_pairs=0, batch_size=32, grad_accum=2, warmup_iters=50,
    max_iters=1000,          # 64k pairs: 0.4 epoch of the full HH-RLHF train split (15 of a test-only copy)
    lr=5e-6,                 # DPO recipes for ~100M-1B models use 1e-6 to 1e-5 (the paper: 1e-6 at 2.8B+)
    eval_pairs=0, eval_every=200,
)
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------- the math
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Preference loss of each pair from sequence logprobs (nats), all four (B,) float.

    h = beta * [(logpi_c - logref_c) - (logpi_r - logref_r)]
      sigmoid: -log sigmoid(h)                         DPO, Rafailov et al. 2023, eq. 7
               -(1-eps) log sigmoid(h) - eps log sigmoid(-h) with label_smoothing eps (conservative DPO,
               Mitchell 2023: the label is flipped with probability eps)
      ipo:     (h / beta - 1 / (2 beta))^2              IPO, Azar et al. 2023 (their h is our h / beta);
               the caller passes logprobs averaged over the response tokens (TRL's length normalisation)
      hinge:   max(0, 1 - h)                            SLiC (Zhao et al. 2023) / RSO (Liu et al. 2023)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are the implicit rewards
    beta * (logpi - logref), detached. Raises ValueError for an unknown loss_type.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen_logratios - rejected_logratios)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (h / beta - 1 / (2 * beta)) ** 2  # regress the log-ratio gap onto 1 / (2 beta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_logprobs(model, batch, average=False):
    """Sequence logprobs of a data.collate_pairs batch (rows [:B] chosen, [B:] rejected): the sum over
    response tokens of log pi(y_t | x, y_<t), or their mean with average=True (for ipo).
    Returns (chosen (B,), rejected (B,)) float32; differentiable through model."""
    target_mask = batch["target_mask"]  # (2B, T)
    logp = model.logprobs(batch["idx"], batch["attention_mask"], target_mask).sum(1)  # (2B,): 0 off the response
    if average:
        logp = logp / target_mask.sum(1).clamp(min=1)
    return logp.chunk(2)


@torch.no_grad()
def precompute_logprobs(model, pairs, rt, batch_size=32, average=False):
    """pair_logprobs of every pair in `pairs` (list of data examples), without gradients, batch_size
    sequences (batch_size // 2 pairs) per forward, pairs of similar length together (less padding). Used
    once for the frozen reference. Returns (chosen (N,), rejected (N,)) float32 on rt.device, in the order
    of `pairs`."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt"])
                   + max(len(pairs[i]["chosen"]), len(pairs[i]["rejected"])))
    chosen, rejected = torch.zeros(len(pairs), device=rt.device), torch.zeros(len(pairs), device=rt.device)
    step = max(1, batch_size // 2)
    for i in range(0, len(pairs), step):
        ids = order[i:i + step]
        batch = common.to_device(data.collate_pairs([pairs[j] for j in ids]), rt)
        with rt.autocast():
            chosen[ids], rejected[ids] = pair_logprobs(model, batch, average)
    return chosen, rejected


def implicit_reward_metrics(chosen_rewards, rejected_rewards):
    """Implicit-reward accuracy P(r_hat_w > r_hat_l) (a tie counts one half) and mean margin r_hat_w - r_hat_l."""
    return {"accuracy": evaluate.win_rate(chosen_rewards, rejected_rewards),
            "margin": (chosen_rewards - rejected_rewards).mean().item()}


def dpo_metrics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, cfg):
    """DPO's figures of a policy from its logprobs of the pairs (not a reward model's scores): mean dpo_loss,
    implicit-reward accuracy and margin (implicit_reward_metrics), and its likelihood accuracy
    P(log pi(y_w|x) > log pi(y_l|x)): how often it prefers the chosen answer by itself."""
    losses, cr, rr = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
                              cfg.label_smoothing)
    return {"loss": losses.mean().item(), **implicit_reward_metrics(cr, rr),
            "likelihood_accuracy": evaluate.win_rate(chosen_logps, rejected_logps)}


@torch.no_grad()
def evaluate_pairs(policy, pairs, ref_chosen, ref_rejected, cfg, rt):
    """dpo_metrics of `policy` on `pairs` (reference logprobs given)."""
    with common.eval_mode(policy):
        pc, pr = precompute_logprobs(policy, pairs, rt, cfg.eval_batch_size, cfg.loss_type == "ipo")
    return dpo_metrics(pc, pr, ref_chosen, ref_rejected, cfg)


def batch_indices(step, micro, n, batch_size, grad_accum, seed):
    """The pairs of micro-batch `micro` of optimiser step `step`: epochs of a fresh shuffle of range(n) (seeded by
    seed and the epoch), cut into batches of batch_size (no partial batch). A function of the step, so a resumed
    run draws the same batches."""
    per_epoch = n // batch_size
    k = step * grad_accum + micro  # the k-th micro-batch of the run
    epoch, i = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return perm[i * batch_size:(i + 1) * batch_size]


# ----------------------------------------------------------------------------- training
def load_pairs(cfg, rt, task):
    """(train, test) pairs: every pair of each ranking (imdb: the comparisons reward.py sampled and the judge ranked;
    hh: K = 2, its pairs), fixed random subsets of train_pairs and eval_pairs, train sharded over the DDP ranks."""
    train_pairs, test_pairs = (data.ranking_pairs(r, cfg.pairs_of_ranking) for r in data.load_rankings(cfg, task))
    train = common.subset(train_pairs, cfg.train_pairs, cfg.seed)[rt.rank::rt.world_size]  # a shard per rank
    test = common.subset(test_pairs, cfg.eval_pairs, cfg.seed)
    if len(train) < cfg.batch_size:
        raise common.UserError(f"{len(train)} train pairs per process, fewer than --batch_size={cfg.batch_size}")
    return train, test


def reference_logprobs(sft_ckpt, train, test, cfg, rt):
    """The frozen reference's logprobs of every train pair (and, on the master, test pair) once, then the reference
    is freed: ((chosen, rejected) (N,) x2 of train, of test or None)."""
    t0, average = time.time(), cfg.loss_type == "ipo"
    reference = model_from_checkpoint(sft_ckpt).to(rt.device).eval()
    ref_train = precompute_logprobs(reference, train, rt, cfg.eval_batch_size, average)
    ref_test = precompute_logprobs(reference, test, rt, cfg.eval_batch_size, average) if rt.master else None
    del reference
    gc.collect()
    if rt.master:
        print(f"reference logprobs of {len(train)} train and {len(test)} test pairs in {time.time() - t0:.0f}s")
    return ref_train, ref_test


def accumulate_dpo_gradients(policy, train, ref_train, it, cfg, rt):
    """Forward + backward of optimiser step `it` over its grad_accum micro-batches (batch_indices). Each micro-batch's
    mean loss over its pairs is scaled by 1 / grad_accum: per micro-batch, not per pair or token as in reward.py and
    sft.py, because every micro-batch on every rank holds exactly batch_size pairs (batch_indices draws no partial
    batch), so this is already the mean over every pair of the step. Returns the step's train figures (loss,
    implicit-reward accuracy and margin, rewards, logprobs), means over its micro-batches."""
    step_means = {}
    for micro in range(cfg.grad_accum):
        ids = batch_indices(it, micro, len(train), cfg.batch_size, cfg.grad_accum, cfg.seed + rt.rank)
        batch = common.to_device(data.collate_pairs([train[i] for i in ids]), rt)
        with rt.autocast():
            policy_chosen, policy_rejected = pair_logprobs(policy, batch, cfg.loss_type == "ipo")  # (B,) x2
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_train[0][ids], ref_train[1][ids], cfg.beta, cfg.loss_type,
            cfg.label_smoothing)
        common.check_finite(it, loss=losses.mean())
        (losses.mean() / cfg.grad_accum).backward()
        step_stats = {"loss": losses.mean().item(), **implicit_reward_metrics(chosen_rewards, rejected_rewards),
                      "rewards_chosen": chosen_rewards.mean().item(),
                      "rewards_rejected": rejected_rewards.mean().item(),
                      "logps_chosen": policy_chosen.mean().item(), "logps_rejected": policy_rejected.mean().item()}
        step_means = {k: step_means.get(k, 0.0) + v / cfg.grad_accum for k, v in step_stats.items()}
    return step_means


def main(argv=None):
    """Train the DPO policy from out/sft.pt on `train` pairs; write out/dpo.pt; return the report (dict)."""
    t_start = time.time()
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    rt = common.setup_runtime(cfg)
    path = os.path.join(cfg.out_dir, "dpo.pt")
    ckpt, done = resume_checkpoint(cfg, path, "dpo", cfg.max_iters)
    if done:
        return common.cleanup(rt) or {}
    _, sft_ckpt = load_sft(cfg, dropout=0.0)  # <out_dir>/sft.pt, dropout 0: pi is deterministic, pi = pi_ref at first
    task = data.load_task(cfg, verbose=rt.master)
    train, test = load_pairs(cfg, rt, task)
    ref_train, ref_test = reference_logprobs(sft_ckpt, train, test, cfg, rt)
    policy = model_from_checkpoint(sft_ckpt).to(rt.device)
    if cfg.compile:  # pair_logprobs calls policy.logprobs: the compiled one from here on (generation stays eager)
        policy.logprobs = CompiledLogprobs(policy)
    optimizer, state, start, logger = start_training(policy, cfg, rt, ckpt, "dpo", {})  # batches: by step
    t_start -= ckpt.get("seconds", 0.0) if ckpt else 0.0  # the report's seconds count the run before a resume too
    pbar = tqdm(range(start, cfg.max_iters), desc="dpo", disable=not rt.master)
    window = []  # per-step metrics since the last log line
    for it in pbar:
        policy.train()
        lr = common.lr_at(it, cfg.max_iters, cfg.lr, cfg.warmup_iters)
        common.set_lr(optimizer, lr)
        step_means = accumulate_dpo_gradients(policy, train, ref_train, it, cfg, rt)
        common.optimizer_step(policy, optimizer, cfg.grad_clip, rt, it)
        window.append({k: common.all_reduce_mean(v, rt) for k, v in step_means.items()})
        if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.max_iters:  # the mean over the last steps
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            logger.log(it, lr=lr, **metrics)
            pbar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                             margin=f"{metrics['margin']:.3f}")
            window = []
        if rt.master and cfg.eval_every > 0 and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.max_iters:
            logger.log(it, **{f"test_{k}": v for k, v in evaluate_pairs(policy, test, *ref_test, cfg, rt).items()})
        if checkpoint_due(it + 1, cfg, cfg.max_iters):
            save_training_state(path, "dpo", cfg, it + 1, cfg.max_iters, rt, **state,
                                seconds=time.time() - t_start)

    report = {}
    if rt.master:
        report = make_report(policy, test, ref_test, task, logger, cfg, rt)
        report["seconds"] = time.time() - t_start
        print(f"dpo.py took {report['seconds']:.0f}s")
    common.cleanup(rt)
    return report


def make_report(policy, test_pairs, ref_test, task, logger, cfg, rt):
    """Print and return the report: the training curve's ends, implicit-reward accuracy / margin on the test
    pairs, then (if out/rm.pt exists) evaluate.compare: SFT and DPO answer the evaluation prompts (the same set
    and seed as every point of the chart), scored by the reward model."""
    # before training the policy is the reference (the same weights, dropout 0): its logprobs of the test pairs are
    # ref_test, so every implicit reward is 0 (a tie: accuracy 0.5, margin 0); its likelihood accuracy is the SFT
    # policy's own preference for the chosen answers
    before = dpo_metrics(*ref_test, *ref_test, cfg)
    final = evaluate_pairs(policy, test_pairs, *ref_test, cfg, rt)
    logger.log(cfg.max_iters - 1, **{f"test_{k}": v for k, v in final.items()})
    logger.plot()
    train_rows = [r for r in logger.rows if "accuracy" in r]
    n = max(1, len(train_rows) // 10)  # first / last 10% of the log lines
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    report = {"loss_first": mean(train_rows[:n], "loss"), "loss_last": mean(train_rows[-n:], "loss"),
              "train_accuracy_last": mean(train_rows[-n:], "accuracy"),
              **{f"test_{k}_before": v for k, v in before.items()},
              **{f"test_{k}": v for k, v in final.items()}}
    print(f"\nDPO ({cfg.loss_type}, beta {cfg.beta}): train loss {report['loss_first']:.4f} -> "
          f"{report['loss_last']:.4f} (first / last {n * cfg.log_every} steps), train batch accuracy "
          f"{report['train_accuracy_last']:.3f} (last {n * cfg.log_every} steps)")
    print(f"test pairs ({len(test_pairs)}), the SFT policy -> DPO: implicit-reward accuracy "
          f"{before['accuracy']:.3f} -> {final['accuracy']:.3f}, margin {before['margin']:.4f} -> "
          f"{final['margin']:.4f}, loss {before['loss']:.4f} -> {final['loss']:.4f}, likelihood accuracy "
          f"{before['likelihood_accuracy']:.3f} -> {final['likelihood_accuracy']:.3f}")
    rm_path = os.path.join(cfg.out_dir, "rm.pt")
    if not os.path.exists(rm_path):
        print(f"no {rm_path}: the sample evaluation (reward-model score, KL, win rate, frontier chart) needs "
              "`python reward.py`; skipped (DPO itself does not need a reward model)")
        return report
    reference = model_from_checkpoint(load_checkpoint(os.path.join(cfg.out_dir, "sft.pt"), stage="sft"))
    reward_model = model_from_checkpoint(load_checkpoint(rm_path, stage="rm", vocab_size=cfg.vocab_size),
                                         scalar_head=True)
    report.update(evaluate.compare("dpo", policy, reference.to(rt.device), reward_model.to(rt.device),
                                   evaluate.eval_prompts(task.prompts_test, cfg), rt, cfg, judge=task.judge))
    return report


if __name__ == "__main__":
    common.cli(main)
