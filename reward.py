"""
Step 2 of InstructGPT (Ouyang et al. 2022, section 3.5): a reward model r_theta(x, y) trained on comparisons: on the
imdb task (the default) K answers of the SFT policy per prompt, ranked by the gold sentiment judge like a noisy human
(make_comparisons; out/imdb/comparisons.pt, which dpo.py trains on too), on hh the (chosen, rejected) human
comparisons of HH-RLHF (K = 2). On imdb the truth is known, so the report checks the reward model against the
judge's noiseless order as well as against the noisy labels (gold_agreement).

The model is the SFT GPT with a fresh scalar head; the reward of x + y is the head's output at its LAST real token
(GPT.score). The loss is InstructGPT's eq. 1 over the K ranked answers of each prompt (ranking_loss), each answer
forwarded once. After training the head's bias takes InstructGPT's normalisation (normalise_rewards).

    python reward.py                       # CPU preset, imdb; needs out/imdb/sft.pt (python sft.py)
    python reward.py --task=hh             # the human comparisons of HH-RLHF
    python reward.py --label_temperature=1 # any config key, --key=value
    torchrun --nproc_per_node=2 reward.py  # DDP (gloo on CPU, nccl on CUDA)

Writes out/<task>/rm.pt (every checkpoint_every steps and at the end; --resume=True continues a killed run),
rm_log.jsonl, rm.png and prints a report (make_report): test pairwise accuracy, margin and loss before and after
training, the "longer response wins" floor, (imdb) the agreement with the gold judge, and a few test pairs with
their scores. The README and docs/cpu_preset.md give the figures to expect.
"""
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import evaluate
from evaluate import win_rate
from checkpoint import (checkpoint_due, load_sft, model_from_checkpoint, resume_checkpoint, save_training_state,
                        start_training)

# ----------------------------------------------------------------------------- config
S = common.setting  # a default with the values it allows, checked by the config parser
config = dict(common.SHARED,  # out_dir, data_dir, device, block_size, checkpoint_every, resume, ... (common.py)
    sft_ckpt="",              # the trunk to start from; "" = <out_dir>/sft.pt
    n_prompts=S(3000, ">= 1"),  # imdb: train prompts, answers_per_prompt SFT answers each, ranked by the gold judge
    n_test_prompts=S(256, ">= 1"),  # imdb: held-out prompts, from test prompts (C(K,2) pairs each)
    answers_per_prompt=S(4, ">= 2"),  # imdb: K answers ranked per prompt (InstructGPT ranks 4-9); hh has K = 2
    label_temperature=S(0.0, ">= 0"),  # imdb: Plackett-Luce temperature of the labeller (0 = the judge's own order)
    label_bias_weight=S(0.0, ">= 0"),  # imdb: a labeller with a bias: + this many log-odds per occurrence of
                              #   label_bias in an answer, on the train rankings only (0 = none); needs its own out_dir
    label_bias="!",           # imdb: the text that biased labeller favours (see label_bias_weight)
    train_rankings=S(0, ">= 0"),  # imdb: train on the first n train rankings of comparisons.pt only (0 = all):
                              #   nested subsets of one set of comparisons, for the reward-model scaling curve (lab.py)
    max_iters=S(400, ">= 1"),  # optimiser steps (400 x 16 prompts: ~2 epochs of the 3,000)
    batch_size=S(16, ">= 1"),  # prompts per micro-batch (a forward of batch_size * K rows)
    grad_accum=S(1, ">= 1"),  # micro-batches per optimiser step (per DDP rank)
    lr=S(1e-3, ">= 0"),       # peak learning rate (warmup, then cosine to 10%)
    weight_decay=S(0.1, ">= 0"),  # AdamW decoupled weight decay on matrices
    grad_clip=S(1.0, ">= 0"),  # max gradient norm (0 = off)
    warmup_frac=S(0.1, "[0, 1]"),  # linear warmup over this fraction of max_iters
    eval_every=S(0, ">= 0"),  # evaluate on `test` every this many steps (0: only at the start and the end)
    eval_rankings=S(0, ">= 0"),  # test rankings per evaluation, a fixed random subset (0 = all)
    norm_examples=S(512, ">= 0"),  # train rankings (a fixed random subset) whose best answers set the normalisation
                                   # (0 = all)
    n_show=S(4, ">= 0"),      # test pairs printed with their scores in the report
)
cuda_config = dict(common.SHARED_CUDA,
    n_prompts=10000, n_test_prompts=500,  # imdb: more comparisons, of the longer answers of the CUDA preset
    max_iters=1500, batch_size=16, lr=2e-5,
    eval_every=250, norm_examples=0,
)


# ----------------------------------------------------------------------------- the math
def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry loss of B pairs: ranking_loss with K = 2 (each pair a prompt).
    chosen_rewards, rejected_rewards: (B,) float rewards of the preferred / other response of each pair.
    Returns a scalar. Computed with F.logsigmoid, stable for any difference (never log(sigmoid())), so a
    difference of -1e4 gives a loss of 1e4, not inf. Its gradient raises r_w and lowers r_l."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def ranking_loss(rewards):
    """K-wise comparison loss, InstructGPT section 3.5 / eq. 1:
        L = - 1 / C(K,2) * sum_{i < j} log sigmoid(r_i - r_j), averaged over the prompts,
    for rewards (P, K) of K responses per prompt ORDERED BEST FIRST (response i is preferred to j when
    i < j). Every response is scored once by the caller; all C(K,2) pairs of a prompt are formed here: C(K,2)
    comparisons for the price of K forwards instead of 2 C(K,2).
    Returns a scalar: the mean of bt_loss over all P * C(K,2) pairs (K = 2 is bt_loss).
    Raises ValueError unless rewards is 2-D with K >= 2."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"ranking_loss wants rewards (P, K) with K >= 2, got shape {tuple(rewards.shape)}")
    K = rewards.shape[1]
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)  # (C(K,2),) each: all pairs i < j
    return bt_loss(rewards[:, i].flatten(), rewards[:, j].flatten())  # (P * C(K,2),) pairs


def ranking_rewards(score, batch, K):
    """Rewards of a data.collate_rankings batch: ONE forward of its P * K rows -> (P, K), best first."""
    return score(batch["idx"], batch["attention_mask"]).view(-1, K)  # head at each row's last real token


def accumulate_ranking_gradients(score, micro_batches, rt, K):
    """Forward + backward of one optimiser step over its micro-batches of rankings (already on rt.device). Each
    micro-batch's mean ranking_loss over its n_i prompts is scaled by n_i / N, N = the prompts of the whole step on
    all DDP ranks (times world_size, because all_reduce_grads then averages the ranks): the gradient is that of one
    mean over every prompt of the step, so 1 micro-batch of 8 == 8 micro-batches of 1. Per prompt, not per token as
    in sft.py: ranking_loss is a mean over prompts (each prompt's C(K,2) pairs), whatever the answers' lengths.
    Returns (loss, accuracy) of the step on this rank, floats; accuracy over the step's C(K,2) pairs per prompt."""
    counts = [b["idx"].shape[0] // K for b in micro_batches]
    total = common.all_reduce_mean(sum(counts), rt) * rt.world_size  # N
    loss_sum, correct = 0.0, 0.0
    i, j = torch.triu_indices(K, K, offset=1)  # every pair (i above j) of a ranking
    for b, n in zip(micro_batches, counts):
        with rt.autocast():
            rewards = ranking_rewards(score, b, K).float()  # (n, K)
        loss = ranking_loss(rewards)
        (loss * n / total * rt.world_size).backward()
        loss_sum += loss.item() * n
        correct += win_rate(rewards[:, i], rewards[:, j]) * n  # pairs ordered as ranked (a tie counts 1/2)
    return loss_sum / sum(counts), correct / sum(counts)


def ranking_metrics(chosen, rejected):
    """How well scores rank N pairs (the reward model's test figures): pairwise accuracy P(r_w > r_l) (a tie counts
    1/2), mean margin r_w - r_l, and bt_loss, of (N,) rewards of the chosen / rejected answers."""
    return dict(accuracy=win_rate(chosen, rejected), margin=(chosen - rejected).mean().item(),
                loss=bt_loss(chosen, rejected).item())


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_answers(model, examples, rt, batch_size):
    """The reward of prompt + chosen of every example, batch_size sequences per forward -> (N,) float32 on the CPU."""
    out = []
    with common.eval_mode(model):
        for a in range(0, len(examples), batch_size):
            batch = common.to_device(data.collate_sft(examples[a:a + batch_size]), rt)
            with rt.autocast():
                out.append(model.score(batch["idx"], batch["attention_mask"]).float().cpu())  # (B,)
    return torch.cat(out)


def score_rankings(model, rankings, rt, batch_size):
    """The reward of every response of `rankings` (lists of K responses each), batch_size sequences per forward ->
    list of K-lists of floats, in the rankings' order."""
    flat = [dict(prompt=r["prompt"], chosen=y) for r in rankings for y in r["responses"]]  # one row per response
    it = iter(score_answers(model, flat, rt, batch_size).tolist())
    return [[next(it) for _ in r["responses"]] for r in rankings]


def pair_scores(rankings, rewards):
    """The pairs of every ranking (data.ranking_pairs order: (0,1), (0,2), ..., (1,2), ...) and the rewards of their
    two answers. rewards: the rankings' K rewards each (list of K-lists, or (P, K)). Returns (pairs, chosen (N,),
    rejected (N,))."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # (P, K)
    i, j = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1)  # the same pairs, in the same order
    return data.ranking_pairs(rankings), rewards[:, i].flatten(), rewards[:, j].flatten()


def gold_agreement(pairs, chosen, rejected, margin=1.0):
    """imdb: how the reward model's order of each test pair compares with the gold judge's. pairs carry the gold
    scores of both answers; chosen, rejected (N,) the reward model's scores. Returns gold_accuracy = P(the reward
    model prefers the answer the judge scores higher), the same on the pairs the judge separates by at least
    `margin` log-odds (gold_accuracy_clear, and their count n_clear), and label_ceiling = P(the noisy label agrees
    with the judge), ties 1/2."""
    g_c = torch.tensor([p["gold_chosen"] for p in pairs])
    g_r = torch.tensor([p["gold_rejected"] for p in pairs])
    judge_picks_chosen = g_c > g_r
    better = torch.where(judge_picks_chosen, chosen, rejected)  # the reward of the answer the judge prefers
    worse = torch.where(judge_picks_chosen, rejected, chosen)
    clear = (g_c - g_r).abs() >= margin
    return dict(gold_accuracy=win_rate(better, worse), label_ceiling=win_rate(g_c, g_r),
                gold_accuracy_clear=win_rate(better[clear], worse[clear]) if clear.any() else float("nan"),
                n_clear=int(clear.sum()))


def comparisons_recipe(cfg, sft_path):
    """What the imdb comparisons depend on: the SFT checkpoint (its file's size and time) and the sampling and
    labelling settings."""
    return dict(sft=f"{os.path.getsize(sft_path)}:{os.path.getmtime(sft_path)}", n_prompts=cfg.n_prompts,
                n_test_prompts=cfg.n_test_prompts, answers_per_prompt=cfg.answers_per_prompt,
                label_temperature=cfg.label_temperature, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                vocab_size=cfg.vocab_size)


def same_comparisons(cfg, recipe):
    """True when out/<task>/comparisons.pt exists and was made by this recipe: reuse it (e.g. a second reward model
    on the same comparisons, or a resumed run) instead of sampling again."""
    path = data.tasks.rankings_path(cfg)
    if not os.path.exists(path):
        return False
    try:
        info = torch.load(path, weights_only=False).get("info", {})
    except Exception as e:  # a damaged file (a kill mid-copy, a truncated download): make it again
        print(f"{path} is damaged ({type(e).__name__}): sampling the comparisons again")
        return False
    if {k: info.get(k) for k in recipe} != recipe:
        return False
    print(f"reusing {path}: made from the same sft.pt with the same settings")
    return True


def make_comparisons(policy, task, cfg, rt, recipe):
    """imdb (InstructGPT section 3.5; Ziegler et al. 2019; DPO paper, section 6.1): the comparisons a human would
    have made. For n_prompts train prompts and n_test_prompts test prompts, K = answers_per_prompt answers each
    from the SFT policy; the gold judge ranks each prompt's K answers like a noisy human (Plackett-Luce at
    label_temperature, data.plackett_luce_ranking). Rankings with two identical answers are dropped. Writes
    out/imdb/comparisons.pt with every answer's gold score (so a reward model can also be checked against the
    noiseless order)."""
    t0, rankings, dropped, K = time.time(), {}, {}, cfg.answers_per_prompt
    labeller = torch.Generator().manual_seed(cfg.seed)
    for split, prompts, n in (("train", task.prompts_train, cfg.n_prompts),
                              ("test", task.prompts_test, cfg.n_test_prompts)):
        prompts = common.subset(prompts, n, cfg.seed)
        repeated = [p for p in prompts for _ in range(K)]  # K consecutive samples of each prompt, one sampler stream
        answers = evaluate.generate_answers(policy, repeated, rt, cfg.max_new_tokens, seed=cfg.seed + 1,
                                            batch_size=cfg.eval_batch_size, desc=f"sampling {split} answers")
        gold = data.gold_scores(task.judge, [p["prompt"] for p in repeated], answers, cfg.vocab_size).view(-1, K)
        order = data.plackett_luce_ranking(gold, cfg.label_temperature, labeller)  # (n, K) best first
        rankings[split] = []
        for i, p in enumerate(prompts):
            ys = answers[i * K:(i + 1) * K]
            if len({tuple(y) for y in ys}) == K:
                rankings[split].append(dict(prompt=p["prompt"], responses=[ys[k] for k in order[i].tolist()],
                                            gold=[gold[i, k].item() for k in order[i].tolist()]))
        dropped[split] = len(prompts) - len(rankings[split])
    data.save_rankings(cfg, rankings, dict(recipe, dropped_identical=dropped))
    print(f"sampled and ranked {len(rankings['train'])} train / {len(rankings['test'])} test prompts x {K} SFT answers "
          f"(Plackett-Luce labels from the gold judge at temperature {cfg.label_temperature}; {sum(dropped.values())} "
          f"prompts with identical answers dropped) in {time.time() - t0:.0f} s -> {data.tasks.rankings_path(cfg)}")


def longer_wins(examples):
    """A floor every reward model must beat: accuracy of "the longer response (in tokens) wins", tie = 1/2."""
    c = torch.tensor([len(e["chosen"]) for e in examples], dtype=torch.float32)
    r = torch.tensor([len(e["rejected"]) for e in examples], dtype=torch.float32)
    return ranking_metrics(c, r)["accuracy"]


def show_pairs(examples, chosen, rejected, n, vocab_size):
    """Print the first n pairs with the reward model's scores (and the judge's, where the pairs carry them)."""
    text = lambda toks: data.decode(toks, vocab_size).replace("\n", " ")
    clip = lambda t, k: t if len(t) <= k else t[:k] + "..."
    for e, c, r in list(zip(examples, chosen.tolist(), rejected.tolist()))[:n]:
        print(f"  PROMPT   ...{text(e['prompt'])[-110:]}")
        for side, score in (("chosen", c), ("rejected", r)):
            gold = f" (gold {e[f'gold_{side}']:+.2f})" if f"gold_{side}" in e else ""
            print(f"    {side:8s} {score:+7.3f}{gold}  {clip(text(e[side]), 100)}")


# ----------------------------------------------------------------------------- set-up, loop pieces, the end of a run
def check_own_folder(cfg):
    """An experiment's reward model (another labeller, less data) never overwrites the pipeline's own rm.pt."""
    if (cfg.label_bias_weight or cfg.train_rankings) and os.path.abspath(cfg.out_dir) == os.path.abspath(
            os.path.join("out", cfg.task)):
        raise common.ConfigError(f"--label_bias_weight / --train_rankings make a reward model of another labeller or "
                                 f"less data: give it a folder of its own, e.g. --out_dir=out/{cfg.task}/rm_biased "
                                 f"--sft_ckpt=out/{cfg.task}/sft.pt, so that out/{cfg.task}/rm.pt stays the default "
                                 f"(`python lab.py` does this for you)")


def load_comparisons(cfg, rt, task, sft_path, sft_ckpt):
    """(train, test) rankings, K responses per prompt, best first. imdb: the master makes comparisons.pt first from
    the SFT policy (make_comparisons) unless same_comparisons. --train_rankings keeps the first n train rankings
    (nested subsets of the same comparisons); --label_bias_weight (imdb only) has a labeller with a bias rank the
    train answers again (data.relabel_rankings), the held-out ones keeping the judge's order."""
    recipe = comparisons_recipe(cfg, sft_path)
    if task.judge is not None and not same_comparisons(cfg, recipe):
        if rt.master:
            make_comparisons(model_from_checkpoint(sft_ckpt).to(rt.device), task, cfg, rt, recipe)
        if rt.ddp:
            torch.distributed.barrier()
    train, test = data.load_rankings(cfg, task)
    if cfg.train_rankings:
        train = train[:cfg.train_rankings]
    if cfg.label_bias_weight and "gold" not in train[0]:
        raise common.ConfigError("--label_bias_weight: only on imdb, whose comparisons carry the judge's scores")
    if cfg.label_bias_weight:
        train = data.relabel_rankings(train, cfg.label_bias_weight, cfg.label_bias, cfg.vocab_size,
                                      cfg.label_temperature, torch.Generator().manual_seed(cfg.seed))
    return train, test


def micro_batches(train, cfg, gen, rt):
    """One optimiser step's grad_accum micro-batches of batch_size train rankings each (drawn by gen), on rt.device."""
    micro = [data.collate_rankings([train[i] for i in torch.randint(len(train), (cfg.batch_size,), generator=gen)])
             for _ in range(cfg.grad_accum)]
    return [common.to_device(b, rt) for b in micro]


def evaluate_rankings(model, rankings, rt, cfg, step):
    """Score every answer of the test rankings and print the figures at `step`. Returns (metrics, rewards (P, K)):
    ranking_metrics over all their pairs, and gold_agreement where the pairs carry the judge's scores (imdb)."""
    rewards = torch.tensor(score_rankings(model, rankings, rt, cfg.eval_batch_size))  # (P, K)
    pairs, c, r = pair_scores(rankings, rewards)
    m = ranking_metrics(c, r)
    if "gold_chosen" in pairs[0]:
        m.update(gold_agreement(pairs, c, r))
    print(f"\nstep {step}: test accuracy {m['accuracy']:.3f}, margin {m['margin']:+.3f}, loss {m['loss']:.4f}"
          + (f", gold agreement {m['gold_accuracy']:.3f}" if "gold_accuracy" in m else ""))
    return m, rewards


@torch.no_grad()
def normalise_rewards(model, train, rt, cfg):
    """InstructGPT's normalisation (section 3.5): shift the head's bias "so that the labeler demonstrations achieve a
    mean score of 0", the best answer of each train ranking (a fixed random subset of norm_examples) standing in for
    the demonstrations. The shift is folded into scalar_head.bias, so every user of rm.pt gets normalised rewards;
    differences of rewards (accuracy, margin) do not change. Returns (the mean before the shift, the answers' count);
    minus that mean is kept as ckpt["reward_bias"]."""
    norm = [dict(prompt=x["prompt"], chosen=x["responses"][0]) for x in common.subset(train, cfg.norm_examples)]
    mean = score_answers(model, norm, rt, cfg.eval_batch_size).mean().item()
    model.scalar_head.bias -= mean
    return mean, len(norm)


# ----------------------------------------------------------------------------- training
def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    check_own_folder(cfg)
    rt = common.setup_runtime(cfg)
    t_start = time.time()
    path = os.path.join(cfg.out_dir, "rm.pt")
    ckpt, done = resume_checkpoint(cfg, path, "rm", cfg.max_iters)
    if done:
        return common.cleanup(rt) or {}
    sft_path, sft_ckpt = load_sft(cfg, cfg.sft_ckpt)  # the trunk: --sft_ckpt, or <out_dir>/sft.pt
    task = data.load_task(cfg, verbose=rt.master)
    train, test = load_comparisons(cfg, rt, task, sft_path, sft_ckpt)
    K = len(train[0]["responses"])
    torch.manual_seed(cfg.seed)  # the same fresh head on every DDP rank
    model = model_from_checkpoint(sft_ckpt, scalar_head=True).to(rt.device).train()  # SFT trunk + fresh head
    del sft_ckpt
    score = torch.compile(model.score, dynamic=True) if cfg.compile else model.score
    test_eval = common.subset(test, cfg.eval_rankings)
    gen = torch.Generator().manual_seed(cfg.seed + rt.rank)  # each rank samples its own batches
    if rt.master:
        print(f"reward model: {sft_path} trunk + fresh scalar head, {model.num_params() / 1e6:.2f}M parameters; "
              f"{len(train)} train / {len(test)} test prompts x K = {K} ranked answers ({K * (K - 1) // 2} pairs each)")
    run_eval = lambda step: evaluate_rankings(model, test_eval, rt, cfg, step)

    before = run_eval(0)[0] if rt.master else None  # the fresh head, also when resuming: "before" = before training
    optimizer, state, start, logger = start_training(model, cfg, rt, ckpt, "rm", dict(gen=gen))
    log_eval = lambda step, m: logger.log(step, **{f"test_{k}": v for k, v in m.items()})
    if rt.master and start == 0:
        log_eval(0, before)
    losses = []
    warmup = max(1, int(cfg.warmup_frac * cfg.max_iters))
    bar = tqdm(range(start, cfg.max_iters), disable=not rt.master, desc="reward", dynamic_ncols=True)
    for step in bar:
        lr = common.lr_at(step, cfg.max_iters, cfg.lr, warmup)
        common.set_lr(optimizer, lr)
        loss, acc = accumulate_ranking_gradients(score, micro_batches(train, cfg, gen, rt), rt, K)
        common.check_finite(step, loss=loss)
        grad_norm = common.optimizer_step(model, optimizer, cfg.grad_clip, rt, step)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        logger.log(step, loss=loss, accuracy=acc, lr=lr, grad_norm=grad_norm)
        periodic = cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0
        if rt.master and periodic and step + 1 < cfg.max_iters:
            log_eval(step + 1, run_eval(step + 1)[0])
        if step + 1 < cfg.max_iters and checkpoint_due(step + 1, cfg, cfg.max_iters):  # the last: below
            save_training_state(path, "rm", cfg, step + 1, cfg.max_iters, rt, **state)
    bar.close()

    report = {}
    if rt.master:
        after, rewards = run_eval(cfg.max_iters)
        log_eval(cfg.max_iters, after)
        mean, n_norm = normalise_rewards(model, train, rt, cfg)
        logger.plot()
    save_training_state(path, "rm", cfg, cfg.max_iters, cfg.max_iters, rt, **state,
                        reward_bias=-mean if rt.master else None)  # normalised: finished
    if rt.master:
        prompts = cfg.batch_size * cfg.grad_accum * rt.world_size
        report = make_report(cfg, test_eval, K, before, after, rewards - mean, mean, n_norm, losses,
                             f"{cfg.max_iters} steps x {prompts} prompts x {K} answers, {time.time() - t_start:.0f} s")
    common.cleanup(rt)
    return report


def make_report(cfg, test_eval, K, before, after, rewards, mean, n_norm, losses, run):
    """Print and return the report: the train losses' ends, the test figures before -> after (evaluate_rankings'),
    the "longer response wins" floor on the same pairs, (imdb) the agreement with the gold judge, the
    normalisation (normalise_rewards: `mean` is the mean it removed, `rewards` the test rankings' rewards after it)
    and the best and the worst answer of the first test prompts."""
    pairs = data.ranking_pairs(test_eval)
    floor = longer_wins(pairs)
    report = dict(**{f"{k}_before": v for k, v in before.items()},
                  **{f"{k}_after": v for k, v in after.items()}, longer_wins=floor, reward_bias=-mean)
    if losses:
        report.update(train_loss_first=sum(losses[:10]) / len(losses[:10]),
                      train_loss_last=sum(losses[-10:]) / len(losses[-10:]))
    print(f"\n=== reward model report ({run}) ===")
    if losses:
        print(f"  train loss {report['train_loss_first']:.4f} -> {report['train_loss_last']:.4f} "
              "(mean of the first 10 steps -> of the last 10)")
    print(f"  test pairs: {len(pairs)} ({len(test_eval)} prompts x {K * (K - 1) // 2})")
    for k in ("accuracy", "margin", "loss"):
        print(f"  test {k:8s} {before[k]:+.4f} -> {after[k]:+.4f}")
    print(f"  floor 'the longer response wins' on the same pairs: {floor:.3f} (shorter wins {1 - floor:.3f})")
    if "gold_accuracy" in after:  # imdb: the truth behind the noisy labels
        print(f"  against the gold judge: the reward model orders {after['gold_accuracy']:.3f} of the test pairs "
              f"as the judge does (noiseless gold order; {after['gold_accuracy_clear']:.3f} of the "
              f"{after['n_clear']} pairs the judge separates by >= 1 log-odds); the noisy labels themselves "
              f"agree with the judge on {after['label_ceiling']:.3f} (the ceiling of the accuracy above)")
    print(f"  normalisation: mean reward of {n_norm} best train answers was {mean:+.4f}; "
          f"scalar_head.bias shifted by {-mean:+.4f} (ckpt['reward_bias'])")
    print("  the best and the worst answer of the first test prompts (normalised rewards):")
    show_pairs(data.ranking_pairs(test_eval, "best_worst"), rewards[:, 0], rewards[:, -1], cfg.n_show,
               cfg.vocab_size)
    print(f"  wrote {cfg.out_dir}/rm.pt, rm_log.jsonl, rm.png")
    return report


if __name__ == "__main__":
    common.cli(main)
