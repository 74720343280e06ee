"""
Step 3 of InstructGPT (Ouyang et al. 2022, section 3.5): optimise the SFT policy against the reward model with PPO
(Schulman et al. 2017), a per-token KL penalty to the frozen SFT reference (Ziegler et al. 2019) and, optionally,
pretraining gradients ("PPO-ptx", InstructGPT eq. 2).

    python ppo.py                                  # CPU preset; runs sft.py / reward.py first if out/ lacks them
    python ppo.py --beta=0.1 --ptx_coef=0.5        # any config key as --key=value (each is explained where it is set)
    torchrun --nproc_per_node=2 ppo.py             # DDP: each rank rolls out its own prompts, gradients averaged

Models: policy and frozen reference <- sft.pt; frozen reward model and trainable critic <- rm.pt (it already predicts
the returns; --critic_init=sft for a fresh head). All stay in eval mode (no dropout), so the rollout's and the
update's logprobs come from one function. One iteration of main():
  1. rollout  answers y ~ pi_old(.|x) to `batch_size` train prompts: log pi_old, log pi_ref, V per response token
  2. score    s = r(x, y) / (std of the first rollout's scores) (Ziegler et al. 2019); critic head likewise
  3. rewards  per_token_rewards: -beta * kl_t, plus s on the last response token (InstructGPT eq. 2)
  4. advantages  compute_gae (then whitened), or critic-free: the prompt's other answers (rloo, grpo), REINFORCE
  5. update   ppo_epochs x shuffled minibatches: clipped policy loss (+ ptx loss), clipped value loss
  6. beta     fixed, or AdaptiveKLController (Ziegler et al. 2019, section 2.2)
The rungs from REINFORCE to this (--advantage_estimator, --surrogate) are run side by side by ladder.py; the logged
figures are explained in docs/ppo.md; `--resume=True` continues a killed run to the same final iteration.

Layout: sequences = cat([prompt (B, P) left-padded, response (B, R)], 1); everything per token is the (B, R) response
slice [:, P:] with `response_mask` (1 up to and including the first EOS). V_t is the critic at position P + t - 1,
the token before response token t (the state in which y_t was chosen); V after the last response token is 0.
"""
import os
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from tqdm import tqdm

import common
import data
import evaluate
from checkpoint import (
    checkpoint_due, load_checkpoint, make_missing_checkpoints, model_from_checkpoint, restore_training_state,
    resume_checkpoint, save_training_state)
from common import setting
from model import last_token_index, sample_answers
from speed import CompiledLogprobs, generate_fn

# ----------------------------------------------------------------------------- config
config = dict(common.SHARED,  # out_dir, data_dir, device, block_size, max_new_tokens, eval_prompts, ... (common.py)
    checkpoint_every=setting(10, ">= 0"),  # iterations between checkpoints of ppo.pt (policy, critic, optimisers, RNG)
    # rollout
    iterations=setting(40, ">= 1"),    # PPO iterations (rollout + update each)
    batch_size=setting(64, ">= 1"),    # prompts per rollout (per DDP rank)
    temperature=setting(1.0, "> 0"),   # sampling temperature; every logprob (old, new, reference) uses the same one
    # reward
    beta=setting(0.2, ">= 0"),         # KL coefficient (initial value when adaptive_kl); README: KL for each beta
    kl_estimator=setting("k1", "k1 | k3"),  # the per-token KL in the reward (kl_estimate); grpo's loss term is
                                       # always k3 (DeepSeekMath): this flag then sets only the logged kl
    adaptive_kl=False,                 # True: beta follows the controller towards target_kl (Ziegler et al. 2019, 2.2)
    target_kl=setting(6.0, "> 0"),     # adaptive_kl: target KL per sequence, nats
    kl_horizon=setting(10000, ">= 1"),  # adaptive_kl: horizon in samples
    reward=setting("rm", "rm | gold"),  # the learned reward model | imdb's gold judge ("PPO-GT": a perfect RM)
    normalize_scores=True,             # False: raw scores, so beta trades nats against the reward model's scale
    missing_eos_penalty=setting(0.0, ">= 0"),  # subtracted from the score of an answer cut off without EOS (0 = off;
                                       # on hh, where the reward model prefers unfinished answers, it keeps EOS)
    # PPO update
    ppo_epochs=setting(2, ">= 1"),      # passes over each rollout batch
    minibatch_size=setting(16, ">= 1"),  # sequences per gradient step
    lr=setting(5e-4, ">= 0"),           # policy AdamW learning rate (a tiny model from scratch takes a large one)
    critic_lr=setting(3e-4, ">= 0"),    # critic AdamW learning rate
    weight_decay=setting(0.0, ">= 0"),  # AdamW decoupled weight decay on matrices, policy and critic
    decay_lr=True,                      # False: constant learning rates instead of cosine decay to 10%
    grad_clip=setting(1.0, ">= 0"),     # max gradient norm, policy and critic each (0 = off)
    cliprange=setting(0.2, "> 0"),      # PPO ratio clip epsilon
    cliprange_value=setting(0.2, "> 0"),  # value clip around V_old
    clip_value_loss=True,               # False: plain 0.5 * (V - returns)^2 instead of the clipped max form
    gamma=setting(1.0, "[0, 1]"),       # discount
    lam=setting(0.95, "[0, 1]"),        # GAE lambda
    whiten_advantages=True,             # False: raw GAE advantages (their scale then follows the reward's)
    advantage_estimator=setting("gae", "gae | reinforce | reinforce_baseline | reward_to_go | rloo | grpo"),
                                        # gae: a critic | reinforce: the answer's return R | reinforce_baseline:
                                        # R - batch mean | reward_to_go: G_t - batch mean of R | rloo: the prompt's
                                        # other samples | grpo: the group's normalised scores, AND the KL moves from
                                        # the reward into the loss (grpo_loss); all but gae: no critic
    surrogate=setting("clip", "clip | klpen | cpi"),  # the policy loss (Schulman et al. 2017): clip (eq. 7) | klpen:
                                        # adaptive KL penalty to pi_old (eq. 8) | cpi: rho * A, nothing holds rho back
    klpen_target=setting(0.01, "> 0"),  # klpen: target KL(pi_old || pi_theta) per token after an update, nats
    klpen_beta=setting(1.0, "> 0"),     # klpen: the penalty's first coefficient (halved / doubled each iteration)
    critic_init=setting("rm", "rm | sft"),  # gae: the critic starts as the reward model | the SFT policy + a fresh head
    samples_per_prompt=setting(1, ">= 1"),  # k responses per prompt, consecutive in the batch (k >= 2: rloo, grpo)
    # PPO-ptx: off in the CPU preset, where it slows the gain and keeps almost nothing (docs/cpu_preset.md);
    # try --ptx_coef=0.5
    ptx_coef=setting(0.0, ">= 0"),      # weight of the pretraining loss (0 = plain PPO)
    ptx_batch_size=setting(4, ">= 1"),  # pretraining windows per gradient step
    ptx_block_size=setting(64, ">= 2"),  # tokens per pretraining window
    # logging
    sample_every=setting(10, ">= 0"),   # log the answers to n_sample_prompts fixed test prompts every N iterations
                                        # and at the last (0 = only at the last)
    n_sample_prompts=setting(2, ">= 0"),  # how many of those prompts (the shortest test prompts; 0 = none)
    eval_every=setting(0, ">= 0"),      # evaluate every N iterations (eval_*: a curve on the reward-versus-KL chart;
                                        # 0 = only in the final report)
)
cuda_config = dict(common.SHARED_CUDA, checkpoint_every=25, iterations=300, batch_size=128, minibatch_size=32,
                   lr=1e-5, critic_lr=5e-5, ptx_batch_size=8, ptx_block_size=512, sample_every=25)


# ----------------------------------------------------------------------------- the math
def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1: sum(x * mask) / sum(mask). x, mask (B, T) -> scalar."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_estimate(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.
    logprobs, ref_logprobs (B, T) float: log pi(y_t), log pi_ref(y_t) of the sampled tokens. kind:
      k1 = log pi - log pi_ref                                  (unbiased, can be negative per token)
      k3 = (ratio - 1) - log ratio, ratio = pi_ref / pi          (unbiased, never negative, lower variance)
    (Schulman, "Approximating KL divergence", 2020). Returns (B, T) in nats. Raises ValueError for another kind."""
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl_estimator {kind!r}: expected 'k1' or 'k3'")


def penalised_scores(scores, has_eos, scale, missing_eos_penalty):
    """The score each answer's last token receives: s / scale (Ziegler et al. 2019's normalisation), minus
    missing_eos_penalty for an answer cut off at max_new_tokens without EOS (the penalty is added to its score, it
    does not replace it). scores, has_eos (B,) float (has_eos 0/1); scale, missing_eos_penalty floats. Returns (B,)."""
    return scores / scale - missing_eos_penalty * (1 - has_eos)


def ptx_loss(policy, text_batch, ptx_coef):
    """PPO-ptx (InstructGPT eq. 2, the gamma * E_{x ~ D_pretrain}[log pi(x)] term, negated to be minimised):
        L_ptx = - ptx_coef * mean_t log pi(x_t | x_<t)     over the target_mask tokens of pretraining text windows
    text_batch: dict idx, attention_mask, target_mask (b, T) (data.sample_text_batch: text that carries no
    preference). Returns a scalar with gradient into the policy."""
    # the windows have no padding: no attention mask, the causal fast path (flash attention on CUDA)
    text_logprobs = policy.logprobs(text_batch["idx"], None, text_batch["target_mask"])  # (b, T)
    return -ptx_coef * masked_mean(text_logprobs, text_batch["target_mask"])


def per_token_rewards(scores, logprobs, ref_logprobs, response_mask, beta, kind="k1"):
    """The per-token reward of RLHF (Ziegler et al. 2019; InstructGPT eq. 2):
        r_t = -beta * kl_t  +  s * 1[t is the last real response token]
    scores (B,) reward-model scores s; logprobs, ref_logprobs, response_mask (B, T) over the response tokens;
    response_mask is 1 up to and including the EOS, so the score lands on the EOS when there is one and never on a
    pad. beta float; kind the KL estimator (see kl_estimate). Returns rewards (B, T) float, 0 outside the mask."""
    kl = kl_estimate(logprobs, ref_logprobs, kind)  # (B, T)
    last = torch.zeros_like(response_mask).scatter_(1, last_token_index(response_mask)[:, None], 1.0)  # (B, T) one-hot
    last = last * response_mask
    return (-beta * kl + scores[:, None] * last) * response_mask


def compute_gae(rewards, values, response_mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), as a backward loop over time:
        delta_t = r_t + gamma * V_{t+1} - V_t           (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}  =  sum_l (gamma lam)^l delta_{t+l}
        returns_t = A_t + V_t
    rewards, values, response_mask (B, T) float; response_mask is a prefix mask (1 on each row's first L_b tokens,
    0 after).
    Returns (advantages, returns), (B, T) each, 0 outside the mask."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * response_mask[:, t + 1] if t + 1 < T else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * response_mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * response_mask
    return advantages, returns


def whiten(x, mask):
    """Masked whitening: (x - mean) / std with the mean and (population) std over the entries where mask is 1,
    so entries outside the mask do not affect it. x, mask (B, T) -> (B, T), 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask  # mean 0, std 1


def policy_loss(logprobs, old_logprobs, advantages, response_mask, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised, token-level mean:
        rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
        L = - mean_t min(rho_t A_t, clip(rho_t, 1 - cliprange, 1 + cliprange) A_t)
    logprobs (B, T) (with grad), old_logprobs, advantages, response_mask (B, T). Returns (loss, clipfrac): clipfrac is
    the fraction of masked tokens where the clipped term is the smaller one, i.e. where no gradient flows."""
    objective, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)  # (B, T) x2
    return -masked_mean(objective, response_mask), masked_mean(clipped, response_mask)


def clipped_surrogate(logprobs, old_logprobs, advantages, cliprange):
    """policy_loss's min(rho_t A_t, clip(rho_t) A_t) per token, and a 0/1 float that is 1 where the clipped term is
    the smaller (no gradient there). (B, T) x2."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages
    return torch.min(unclipped, clipped), (clipped < unclipped).float()


def rloo_advantages(rewards, k):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline is the mean reward
    of the OTHER k - 1 samples of its prompt,  A_i = R_i - 1 / (k - 1) * sum_{j != i} R_j.
    rewards (N,) float, N / k consecutive groups of k samples of one prompt; R_i = score_i - beta * sum_t kl_t.
    Returns (N,). Raises ValueError unless k >= 2 divides N."""
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"rloo_advantages: need k >= 2 dividing the {rewards.numel()} rewards, got k = {k}")
    R = rewards.view(-1, k)  # (G, k)
    baseline = (R.sum(1, keepdim=True) - R) / (k - 1)
    return (R - baseline).flatten()


def grpo_advantages(scores, k, eps=1e-4):
    """GRPO's group-normalised advantage (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome supervision):
        A_i = (s_i - mean_j s_j) / (std_j s_j + eps)   over the k samples of a prompt (sample std, n - 1)
    scores (N,) float in N / k consecutive groups of k. Returns (N,); a group of equal scores gives 0 (no nan).
    Raises ValueError unless k >= 2 divides N."""
    if k < 2 or scores.numel() % k:
        raise ValueError(f"grpo_advantages: need k >= 2 dividing the {scores.numel()} scores, got k = {k}")
    s = scores.view(-1, k)  # (G, k)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, response_mask, cliprange, beta):
    """GRPO's objective (DeepSeekMath, eq. 3), negated: per token the clipped surrogate plus the KL to the reference
    as a loss term (not in the reward), beta * k3 with k3 = pi_ref / pi - log(pi_ref / pi) - 1; each sequence's
    token losses are averaged first, then the mean is over sequences (1/G sum_i 1/|o_i| sum_t):
        L = mean_i [ 1 / |o_i| * sum_t ( -min(rho_t A_i, clip(rho_t) A_i) + beta * k3_t ) ]
    logprobs (B, T) (with grad), old_logprobs, ref_logprobs, advantages, response_mask (B, T).
    Returns (loss, clipfrac)."""
    objective, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)  # (B, T) x2
    per_token = -objective + beta * kl_estimate(logprobs, ref_logprobs, "k3")  # (B, T)
    per_sequence = (per_token * response_mask).sum(1) / response_mask.sum(1).clamp(min=1)  # (B,)
    return per_sequence.mean(), masked_mean(clipped, response_mask)


def reinforce_advantages(rewards, response_mask, estimator, gamma):
    """The ladder's first rungs, on-policy REINFORCE (Williams 1992) without a critic, R = sum_t r_t:
        reinforce:           A_t = R                  every token weighted by the whole answer's return
        reinforce_baseline:  A_t = R - b              b = mean of R over this rank's batch
        reward_to_go:        A_t = G_t - b            G_t = sum_{t' >= t} gamma^(t' - t) r_t'  (credit assignment)
    rewards, response_mask (B, T) float. Returns (B, T), 0 outside the mask. Raises ValueError for another
    estimator."""
    R = rewards.sum(1, keepdim=True)  # (B, 1)
    if estimator == "reinforce":
        return R * response_mask
    if estimator == "reinforce_baseline":
        return (R - R.mean()) * response_mask
    if estimator == "reward_to_go":  # GAE with V = 0 and lam = 1 is the discounted reward-to-go
        G = compute_gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0)[0]  # (B, T)
        return (G - R.mean()) * response_mask
    raise ValueError(f"reinforce_advantages: estimator {estimator!r}")


def critic_free_advantages(scores, rewards, response_mask, estimator, k, gamma):
    """The advantage of every response token when there is no critic. rloo: the leave-one-out advantage of
    R_i = sum_t r_t = score - beta * KL; grpo: the group-normalised score (its KL term is in the loss); the REINFORCE
    rungs: reinforce_advantages. scores (B,), rewards (B, R) per-token rewards, response_mask (B, R). Returns (B, R),
    0 outside the mask."""
    if estimator == "rloo":
        return rloo_advantages(rewards.sum(1), k)[:, None] * response_mask
    if estimator == "grpo":
        return grpo_advantages(scores, k)[:, None] * response_mask
    return reinforce_advantages(rewards, response_mask, estimator, gamma)


def cpi_loss(logprobs, old_logprobs, advantages, response_mask, cliprange):
    """The importance-sampled surrogate with nothing holding the ratio back ("CPI", Kakade & Langford 2002;
    Schulman et al. 2017, eq. 6), negated:  L = - mean_t rho_t A_t,  rho_t = pi_theta(y_t) / pi_old(y_t).
    At rho = 1 (an update's first step) its gradient is the policy gradient - mean_t A_t grad log pi(y_t).
    Shapes as policy_loss. Returns (loss, clipfrac): where PPO-clip would have cut the gradient (logged only)."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)[1]
    return -masked_mean(ratio * advantages, response_mask), masked_mean(clipped, response_mask)


def klpen_loss(logprobs, old_logprobs, advantages, response_mask, cliprange, beta_old):
    """PPO's KL-penalised surrogate (Schulman et al. 2017, eq. 8), negated:
        L = - mean_t rho_t A_t + beta_old * mean_t KL_t(pi_old || pi_theta)
    the per-token KL estimated by k3 on the tokens pi_old sampled, (rho - 1) - log rho. beta_old float (adapted by
    klpen_beta_update). Shapes and clipfrac as cpi_loss."""
    loss, clipfrac = cpi_loss(logprobs, old_logprobs, advantages, response_mask, cliprange)
    return loss + beta_old * masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), response_mask), clipfrac


def klpen_beta_update(beta_old, kl, target):
    """PPO's adaptive penalty coefficient (Schulman et al. 2017, section 4), after an update that moved the policy
    by kl = mean KL(pi_old || pi_theta):  kl < target / 1.5 -> beta / 2;  kl > target * 1.5 -> beta * 2."""
    if kl < target / 1.5:
        return beta_old / 2
    if kl > target * 1.5:
        return beta_old * 2
    return beta_old


def value_loss(values, old_values, returns, response_mask, cliprange_value):
    """Clipped value loss (the PPO baselines code of Schulman et al. 2017), token-level mean:
        V_clip = V_old + clip(V - V_old, -cliprange_value, cliprange_value)
        L = 0.5 * mean_t max((V_t - returns_t)^2, (V_clip_t - returns_t)^2)
    values (B, T) (with grad), old_values, returns, response_mask (B, T). cliprange_value None: no clipping,
    L = 0.5 * mean_t (V_t - returns_t)^2 and clipfrac 0. Returns (loss, clipfrac): the fraction of masked tokens where
    the clipped term is the larger one."""
    if cliprange_value is None:
        return 0.5 * masked_mean((values - returns) ** 2, response_mask), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), response_mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), response_mask)
    return loss, clipfrac


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2):
        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    KL is the current KL per sequence (nats), n_steps the number of samples since the last update."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def explained_variance(values, returns, response_mask):
    """1 - Var(returns - values) / Var(returns) over the masked tokens (cleanrl's diagnostic of the critic)."""
    var = lambda x: masked_mean((x - masked_mean(x, response_mask)) ** 2, response_mask)
    return 1 - var(returns - values) / var(returns).clamp(min=1e-8)


# ----------------------------------------------------------------------------- rollout and update
@torch.no_grad()
def rollout(policy, reference, critic, reward_model, prompts, rt, max_new_tokens, temperature, sampler,
            policy_logprobs=None):
    """Step 1-2 of an iteration: sample one response per prompt from pi_old and record, for every response token,
    what the update needs. prompts: a data.collate_prompts batch (left-padded (B, P)). policy_logprobs: the function
    computing log pi_theta that the update uses (policy.logprobs, or its torch.compile with --compile), so that
    log pi_old comes from the same computation and the first ratio pi_theta / pi_old of an update is 1 (exactly in
    eager mode; compiled, the no-grad and the grad graphs may differ by float rounding, ~1e-6). Answers are sampled
    with speed.generate_fn(policy, rt). Returns a SimpleNamespace of aligned tensors on rt.device:
      idx, attn          (B, P+R)  prompt + response tokens, their attention mask
      target_mask        (B, P+R)  1 on the response tokens: P zeros, then response_mask
      P                  int       the (padded) prompt width: response token t sits at position P + t
      response_mask      (B, R)    1 up to and including the first EOS, 0 after it
      old_logprobs       (B, R)    log pi_old(y_t | x, y_<t) at `temperature`
      ref_logprobs       (B, R)    log pi_ref(y_t | x, y_<t) at `temperature`
      entropy            (B, R)    entropy of pi_old's distribution at t (nats)
      old_values         (B, R)    V_old_t = the critic at position P + t - 1, the token before y_t (0 without one)
      scores             (B,)      r(x, y) at the last real token (its EOS when it has one), raw reward-model units
      has_eos            (B,)      1 if the response ended with EOS
    Everything is 0 outside the response mask."""
    prompt_idx, prompt_mask = prompts["idx"].to(rt.device), prompts["attention_mask"].to(rt.device)  # (B, P)
    P = prompt_idx.shape[1]
    with rt.autocast():
        s = sample_answers(policy, prompt_idx, prompt_mask, max_new_tokens, temperature, sampler,
                           generate=generate_fn(policy, rt))
        idx, attn, target_mask = s["idx"], s["attention_mask"], s["target_mask"]  # (B, P+R) x3
        response_mask = s["response_mask"]  # (B, R) 1 through the first EOS
        policy_logprobs = policy_logprobs or policy.logprobs  # the update's function: the first ratio is 1
        logprobs, entropy = policy_logprobs(idx, attn, target_mask, temperature, return_entropy=True)  # (B, P+R) x2
        ref_logprobs = reference.logprobs(idx, attn, target_mask, temperature)  # (B, P+R)
        values = torch.zeros_like(response_mask)  # (B, R) V_t, 0 without a critic (rloo, grpo)
        if critic:
            values = critic.scalar(idx, attn)[:, P - 1:-1] * response_mask
        scores = reward_model.score(idx, attn)  # (B,) r(x, y) at the last real token
    return SimpleNamespace(idx=idx, attn=attn, target_mask=target_mask, P=P, response_mask=response_mask,
                           old_logprobs=logprobs[:, P:], ref_logprobs=ref_logprobs[:, P:], entropy=entropy[:, P:],
                           old_values=values, scores=scores.float(), has_eos=s["has_eos"])


def update(run, batch, advantages, returns, old_values, beta, cfg, rt, text, it):
    """Step 5: ppo_epochs passes over shuffled minibatches of the rollout: the policy loss (--surrogate; grpo: GRPO's
    loss) plus the ptx loss, and (gae) the (clipped) value loss, one optimiser step each per minibatch. run: what
    trains (policy, critic or None, their optimisers, logprobs: the function computing log pi_theta) and gen (the
    minibatch order, the ptx windows); batch: rollout()'s namespace (read only); advantages, returns, old_values
    (B, R) (returns None without a critic); text: the pretraining tokens; it: the iteration (for error messages).
    Returns the mean of each loss / diagnostic over the minibatch steps."""
    policy, critic, train_logprobs, gen = run.policy, run.critic, run.logprobs, run.gen
    cliprange_value = cfg.cliprange_value if cfg.clip_value_loss else None
    P, stats = batch.P, defaultdict(list)
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(batch.idx), generator=gen).to(rt.device).split(cfg.minibatch_size):
            response_mask, idx, attn = batch.response_mask[mb], batch.idx[mb], batch.attn[mb]  # (b, R), (b, P+R) x2
            with rt.autocast():
                logprobs = train_logprobs(idx, attn, batch.target_mask[mb], cfg.temperature)[:, P:]  # (b, R)
                old, adv = batch.old_logprobs[mb], advantages[mb]  # (b, R) x2
                if cfg.advantage_estimator == "grpo":  # the KL to the reference is a loss term, not a reward
                    pg_loss, pg_clipfrac = grpo_loss(logprobs, old, batch.ref_logprobs[mb], adv, response_mask,
                                                     cfg.cliprange, beta)
                elif cfg.surrogate == "clip":
                    pg_loss, pg_clipfrac = policy_loss(logprobs, old, adv, response_mask, cfg.cliprange)
                elif cfg.surrogate == "klpen":
                    pg_loss, pg_clipfrac = klpen_loss(logprobs, old, adv, response_mask, cfg.cliprange, run.klpen_beta)
                else:
                    pg_loss, pg_clipfrac = cpi_loss(logprobs, old, adv, response_mask, cfg.cliprange)
                ptx = torch.zeros((), device=rt.device)
                if cfg.ptx_coef > 0:  # PPO-ptx: a batch of pretraining text windows
                    tb = data.sample_text_batch(text, cfg.ptx_batch_size, cfg.ptx_block_size, gen)
                    ptx = ptx_loss(policy, common.to_device(tb, rt), cfg.ptx_coef)
            common.check_finite(it, policy_loss=pg_loss, ptx_loss=ptx)
            (pg_loss + ptx).backward()
            common.optimizer_step(policy, run.opt_policy, cfg.grad_clip, rt, it)
            approx_kl = masked_mean(kl_estimate(old, logprobs.detach(), "k3"), response_mask)  # KL(old || new)
            step_stats = dict(policy_loss=pg_loss, ptx_loss=ptx, approx_kl=approx_kl, policy_clipfrac=pg_clipfrac)
            if critic is not None:
                with rt.autocast():
                    values = critic.scalar(idx, attn)[:, P - 1:-1]  # (b, R) V_t, the rollout's convention
                    vf_loss, vf_clipfrac = value_loss(values, old_values[mb], returns[mb], response_mask,
                                                      cliprange_value)
                common.check_finite(it, value_loss=vf_loss)
                vf_loss.backward()
                common.optimizer_step(critic, run.opt_critic, cfg.grad_clip, rt, it)
                step_stats.update(value_loss=vf_loss, value_clipfrac=vf_clipfrac)
            for k, v in step_stats.items():
                stats[k].append(v.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


@torch.no_grad()
def policy_drift(run, batch, cfg, rt):
    """After an update: mean_t KL(pi_old || pi_theta) over the rollout's response tokens (k3), the mean over the DDP
    ranks (a float)."""
    with rt.autocast():
        logprobs = run.logprobs(batch.idx, batch.attn, batch.target_mask, cfg.temperature)[:, batch.P:]  # (B, R)
    return common.all_reduce_mean(masked_mean(kl_estimate(batch.old_logprobs, logprobs.float(), "k3"),
                                              batch.response_mask), rt)


def responses(batch):
    """The sampled responses of a rollout as token lists (through the EOS, nothing after it)."""
    return [row[:int(n)] for row, n in zip(batch.idx[:, batch.P:].tolist(), batch.response_mask.sum(1).tolist())]


def score_scale(scores, cfg, rt, what="scores"):
    """Ziegler et al. 2019: rewards normalised to std 1 on the initial policy's answers. Returns the std of `scores`
    (B,), the first rollout's, over every DDP rank: 1 with normalize_scores off, or when every score is alike
    (dividing by 0 would make every reward inf or nan), with a warning naming `what`."""
    s = common.global_std(scores, rt) if cfg.normalize_scores else 1.0
    if not s > 1e-8:
        if rt.master:
            tqdm.write(f"warning: the first rollout's {what} have std {s:.3g}; not normalising them (scale 1)")
        s = 1.0
    return s


@torch.no_grad()
def rescale_critic(critic, scale):
    """Put the critic (a copy of the reward model) in the rewards' normalised units: divide its head (weight and bias)
    by `scale`, the std of the reward model's own scores on the first rollout. In place."""
    for p in critic.scalar_head.parameters():
        p /= scale


def rollout_metrics(batch, scores, rewards, values, returns, beta, kl_estimator):
    """The rollout's figures logged each iteration (see the module docstring), means over the batch: scores (B,) the
    rewards' scores (the judge's with --reward=gold), values and returns (B, R) (returns None without a critic)."""
    kl = (kl_estimate(batch.old_logprobs, batch.ref_logprobs, kl_estimator) * batch.response_mask).sum(1)  # (B,)
    metrics = dict(score=scores.mean(), kl=kl.mean(), objective=rewards.sum(1).mean(), beta=beta,
                   entropy=masked_mean(batch.entropy, batch.response_mask), length=batch.response_mask.sum(1).mean(),
                   eos_rate=batch.has_eos.mean())
    if returns is not None:  # a critic to judge
        metrics["explained_var"] = explained_variance(values, returns, batch.response_mask)
    return metrics


# ----------------------------------------------------------------------------- training
def check_combinations(cfg):
    """ConfigError for settings each allowed but not together (what one setting() declaration cannot say): the gold
    reward on a task without a judge, rloo / grpo with fewer than two samples per prompt (their baseline comes
    from the other samples)."""
    if cfg.reward == "gold" and cfg.task != "imdb":
        raise common.ConfigError(f"--reward={cfg.reward}: expected rm, or gold on the imdb task (hh has no judge)")
    if cfg.advantage_estimator in ("rloo", "grpo") and cfg.samples_per_prompt < 2:
        raise common.ConfigError(f"--advantage_estimator={cfg.advantage_estimator} needs --samples_per_prompt >= 2 "
                                 f"(got {cfg.samples_per_prompt}): its baseline is the prompt's other samples")
    if cfg.advantage_estimator == "grpo" and cfg.surrogate != "clip":
        raise common.ConfigError(f"--surrogate={cfg.surrogate} with --advantage_estimator=grpo: GRPO's loss is its own "
                                 "clipped one (grpo_loss); pass --surrogate=clip")


def load_ppo_models(cfg, rt, prompts):
    """Policy + frozen reference from out/sft.pt, frozen reward model + trainable critic (gae only) from out/rm.pt, on
    rt.device and in eval mode throughout. Raises UserError for a missing or wrong checkpoint, or when the longest of
    the `prompts` plus max_new_tokens does not fit its block_size."""
    sft_ckpt = load_checkpoint(os.path.join(cfg.out_dir, "sft.pt"), stage="sft", vocab_size=cfg.vocab_size)
    rm_ckpt = load_checkpoint(os.path.join(cfg.out_dir, "rm.pt"), stage="rm", vocab_size=cfg.vocab_size)
    load = lambda ckpt, head: model_from_checkpoint(ckpt, scalar_head=head).to(rt.device).eval()
    policy = load(sft_ckpt, False)
    critic = load(rm_ckpt if cfg.critic_init == "rm" else sft_ckpt, True) if cfg.advantage_estimator == "gae" else None
    reference, reward_model = load(sft_ckpt, False).requires_grad_(False), load(rm_ckpt, True).requires_grad_(False)
    longest = max(len(e["prompt"]) for e in prompts)
    if longest + cfg.max_new_tokens > policy.config.block_size:
        raise common.UserError(f"prompts of up to {longest} tokens (--max_prompt_len={cfg.max_prompt_len}) + "
                               f"--max_new_tokens={cfg.max_new_tokens} exceed the block_size "
                               f"{policy.config.block_size} of {cfg.out_dir}/sft.pt")
    return policy, reference, critic, reward_model


def start_run(cfg, rt, prompts, ckpt):
    """Everything an iteration uses: the four models, the optimisers, the KL controller, the samplers (gen: prompts,
    minibatch order, text windows; sampler: the rollout's tokens), the state that save_training_state writes, the
    first iteration and the score scale (None until the first rollout), restored from ppo.pt when resuming."""
    policy, reference, critic, reward_model = load_ppo_models(cfg, rt, prompts)
    run = SimpleNamespace(policy=policy, reference=reference, critic=critic, reward_model=reward_model,
                          logprobs=CompiledLogprobs(policy) if cfg.compile else policy.logprobs)
    run.opt_policy = common.configure_optimizer(policy, cfg.lr, cfg.weight_decay)
    run.opt_critic = common.configure_optimizer(critic, cfg.critic_lr, cfg.weight_decay) if critic else None
    run.kl_ctl = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
    run.gen = torch.Generator().manual_seed(cfg.seed + rt.rank)
    run.sampler = torch.Generator(device=rt.device).manual_seed(cfg.seed + rt.rank)
    state = dict(models=dict(model=policy, critic=critic),
                 optimizers=dict(policy=run.opt_policy, critic=run.opt_critic),
                 generators=dict(gen=run.gen, sampler=run.sampler))
    run.state = {k: {name: x for name, x in v.items() if x is not None} for k, v in state.items()}  # no critic: none
    run.start, run.score_scale, run.klpen_beta = 0, None, cfg.klpen_beta
    if ckpt:
        run.start, run.score_scale = restore_training_state(ckpt, rt, **run.state), ckpt["score_scale"]
        run.klpen_beta = ckpt.get("klpen_beta", cfg.klpen_beta)
        if run.kl_ctl:
            run.kl_ctl.value = ckpt["beta"]
    return run


def iteration(run, it, beta, cfg, rt, task):
    """Iteration `it`, steps 1-6 of the module docstring top to bottom. Returns the iteration's figures, means over
    the DDP ranks. What it changes: the models and optimisers (step 5), beta (step 6), and at the first iteration
    run.score_scale and the critic's head (step 2)."""
    lr_scale = common.lr_at(it, cfg.iterations, 1.0, 0) if cfg.decay_lr else 1.0
    common.set_lr(run.opt_policy, cfg.lr * lr_scale)
    if run.critic:
        common.set_lr(run.opt_critic, cfg.critic_lr * lr_scale)

    # 1. rollout: k answers to each of batch_size train prompts from pi_old; log pi_old, log pi_ref, V_old per token
    t_rollout = time.time()
    train = task.prompts_train
    examples = [train[i] for i in torch.randperm(len(train), generator=run.gen)[:cfg.batch_size]
                for _ in range(cfg.samples_per_prompt)]  # k samples of each prompt, consecutive
    batch = rollout(run.policy, run.reference, run.critic, run.reward_model, data.collate_prompts(examples), rt,
                    cfg.max_new_tokens, cfg.temperature, run.sampler, run.logprobs)
    values = batch.old_values  # (B, R) V_old

    # 2. score: s = r(x, y), the reward model's (--reward=gold: the judge's, what RL achieves with a perfect one)
    gold = data.gold_scores(task.judge, [e["prompt"] for e in examples], responses(batch),
                            cfg.vocab_size) if task.judge else None
    scores = gold.to(rt.device) if cfg.reward == "gold" else batch.scores  # (B,)
    if run.score_scale is None:  # the first rollout, the SFT policy's answers, sets the units of s once and for all
        run.score_scale = score_scale(scores, cfg, rt)
        critic_scale = score_scale(batch.scores, cfg, rt, "reward-model scores") if cfg.reward == "gold" else \
            run.score_scale  # the critic is a copy of the reward model: its own scores' std
        if run.critic and cfg.critic_init == "rm":  # a fresh head (critic_init=sft) has no units to change
            rescale_critic(run.critic, critic_scale)
            values = values / critic_scale  # this rollout's values came from the critic before its rescaling
        if rt.master:
            tqdm.write(f"std of the SFT policy's scores {run.score_scale:.4f}: rewards use s / {run.score_scale:.4f}, "
                       f"the critic its own scores / {critic_scale:.4f}")
    final_scores = penalised_scores(scores, batch.has_eos, run.score_scale, cfg.missing_eos_penalty)  # (B,)

    # 3. per-token rewards: -beta * kl_t, plus the score on the last response token
    rewards = per_token_rewards(final_scores, batch.old_logprobs, batch.ref_logprobs, batch.response_mask, beta,
                                cfg.kl_estimator)  # (B, R)

    # 4. advantages: GAE on the critic's values (then whitened), or critic-free from the prompt's other answers
    if cfg.advantage_estimator == "gae":
        advantages, returns = compute_gae(rewards, values, batch.response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, batch.response_mask)
    else:
        advantages, returns = critic_free_advantages(final_scores, rewards, batch.response_mask,
                                                     cfg.advantage_estimator, cfg.samples_per_prompt, cfg.gamma), None

    # 5. update: ppo_epochs x shuffled minibatches of policy (+ ptx) and value steps
    t_update = time.time()
    stats = update(run, batch, advantages, returns, values, beta, cfg, rt, task.text, it)

    # 6. log, and beta for the next iteration (klpen: and its penalty's, from how far this update moved the policy)
    if cfg.surrogate == "klpen":
        stats.update(klpen_beta=run.klpen_beta, policy_drift=policy_drift(run, batch, cfg, rt))
        run.klpen_beta = klpen_beta_update(run.klpen_beta, stats["policy_drift"], cfg.klpen_target)
    metrics = dict(rollout_metrics(batch, scores, rewards, values, returns, beta, cfg.kl_estimator),
                   lr=cfg.lr * lr_scale, rollout_s=t_update - t_rollout, update_s=time.time() - t_update, **stats)
    if gold is not None:  # the truth behind the proxy score: does the policy really get more positive?
        metrics["gold"] = gold.mean()
    metrics = {k: common.all_reduce_mean(v, rt) for k, v in metrics.items()}  # means over the ranks
    if run.kl_ctl:
        run.kl_ctl.update(metrics["kl"], len(batch.idx) * rt.world_size)
    return metrics


def samples_and_evaluation(run, it, cfg, rt, task):
    """The master's extra figures of iteration `it`: the answers to the shortest test prompts (every sample_every
    iterations and at the last) and, every eval_every iterations, the evaluation (the reward-versus-KL curve)."""
    metrics = {}
    if rt.master and ((cfg.sample_every and it % cfg.sample_every == 0) or it == cfg.iterations - 1):
        prompts = sorted(task.prompts_test, key=lambda e: len(e["prompt"]))[:cfg.n_sample_prompts]
        for i, answer in enumerate(evaluate.answers_text(run.policy, prompts, rt, cfg.max_new_tokens, seed=cfg.seed)):
            metrics[f"sample_{i}"] = answer
            tqdm.write(f"[iter {it}] sample {i}: {answer!r}")
    if rt.master and cfg.eval_every and (it + 1) % cfg.eval_every == 0:
        metrics.update({f"eval_{k}": v for k, v in evaluate.summarize(evaluate.sample_and_score(
            run.policy, run.reference, run.reward_model, evaluate.eval_prompts(task.prompts_test, cfg), rt,
            cfg.eval_batch_size, cfg.max_new_tokens, seed=cfg.eval_seed, judge=task.judge)).items()})
    return metrics


def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    check_combinations(cfg)
    make_missing_checkpoints(cfg, "sft", "rm")  # `python ppo.py` on a fresh machine runs sft.py, reward.py first
    rt = common.setup_runtime(cfg)
    t0 = time.time()
    path = os.path.join(cfg.out_dir, "ppo.pt")
    ckpt, done = resume_checkpoint(cfg, path, "ppo", cfg.iterations)
    if done:
        return common.cleanup(rt) or {}
    task = data.load_task(cfg, verbose=rt.master)  # train prompts, pretraining text for ptx, the judge (imdb)
    run = start_run(cfg, rt, task.prompts_train, ckpt)
    t0 -= ckpt.get("seconds", 0.0) if ckpt else 0.0  # the report's seconds count the run before a resume too
    logger = common.Logger(cfg.out_dir, "ppo", rt.master, start_step=run.start, x_label="iteration")

    pbar = tqdm(range(run.start, cfg.iterations), desc="ppo", disable=not rt.master)
    for it in pbar:
        beta = run.kl_ctl.value if run.kl_ctl else cfg.beta
        metrics = iteration(run, it, beta, cfg, rt, task)
        pbar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.2f}", beta=f"{beta:.3f}",
                         **({"gold": f"{metrics['gold']:.2f}"} if "gold" in metrics else {}))
        logger.log(it, **metrics, **samples_and_evaluation(run, it, cfg, rt, task))
        if checkpoint_due(it + 1, cfg, cfg.iterations):
            save_training_state(path, "ppo", cfg, it + 1, cfg.iterations, rt, **run.state,
                                score_scale=run.score_scale, beta=run.kl_ctl.value if run.kl_ctl else cfg.beta,
                                klpen_beta=run.klpen_beta, seconds=time.time() - t0)
    logger.plot()

    report = {}
    if rt.master:
        report = evaluate.compare("ppo", run.policy, run.reference, run.reward_model,
                                  evaluate.eval_prompts(task.prompts_test, cfg), rt, cfg, judge=task.judge)
        report.update(score_scale=run.score_scale, seconds=time.time() - t0)
        print(f"  ppo.py took {report['seconds']:.0f} s; wrote {cfg.out_dir}/ppo.pt, ppo_log.jsonl, ppo.png")
    common.cleanup(rt)
    return report


if __name__ == "__main__":
    common.cli(main)
