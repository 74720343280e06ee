"""
Step 2 of InstructGPT (Ouyang et al. 2022, section 3.5): a reward model r_theta(x, y) trained on comparisons:
on the imdb task (the default) pairs of SFT answers labelled by the gold sentiment judge, on hh the (chosen,
rejected) human comparisons of HH-RLHF.

imdb first makes its pairs (make_pairs; Ziegler et al. 2019, DPO paper section 6.1): for `n_pairs` train prompts,
two answers from out/imdb/sft.pt; the judge labels each pair like a noisy human, the first answer chosen with
probability sigmoid(g1 - g2) (Bradley-Terry), and both gold scores are kept (out/imdb/pairs.pt, which dpo.py
trains on too). Because the truth is known, the report checks the reward model against the judge's noiseless
order as well as against the noisy labels, next to the labels' own agreement with the judge (the ceiling).

The model is the SFT GPT with a fresh scalar head; the reward of x + y is the head's output at its LAST real
token (GPT.score). The loss is Bradley-Terry (InstructGPT eq. 1):

    loss(theta) = - 1 / C(K,2) * E_{(x, y_w, y_l)} [ log sigmoid( r_theta(x, y_w) - r_theta(x, y_l) ) ]

where y_w is the preferred response. With K ranked responses per prompt all C(K,2) pairs of a prompt go in
one batch and each response is forwarded once (ranking_loss); both tasks have K = 2, so a batch of B pairs
is ONE forward of 2B rows (data.collate_pairs: rows [:B] chosen, [B:] rejected) and bt_loss.
After training, the head's bias is shifted so that the mean reward of the `train` chosen responses is 0
(InstructGPT's normalisation, "so that the labeler demonstrations achieve a mean score of 0"); the shift
is folded into scalar_head.bias, so every user of rm.pt gets normalised rewards, and is also stored as
ckpt["reward_bias"].

    python reward.py                       # CPU preset, imdb; needs out/imdb/sft.pt (python sft.py)
    python reward.py --task=hh             # the human comparisons of HH-RLHF
    python reward.py --max_iters=500       # any config key, --key=value
    torchrun --nproc_per_node=2 reward.py  # DDP (gloo on CPU, nccl on CUDA)

Writes out/<task>/rm.pt (every checkpoint_every steps and at the end; --resume=True continues a killed run),
rm_log.jsonl, rm.png and prints a report: test pairwise accuracy, mean margin and loss before and after
training, the "longer response wins" floor on the same pairs, (imdb) the agreement with the gold judge, and a
few test pairs with their scores.

What to expect on hh: with the CPU preset (7.3M parameters, 4,175 train pairs) the TEST accuracy stays at chance
(about 0.50 +- 0.023 on the 467 test pairs, where "longer wins" scores 0.484). The train loss falls because
the model memorises the pairs it is trained on (in a 250-step run: accuracy 0.82 on train pairs it had
seen, 0.51 on train pairs it had not), not because it learns a preference that transfers; even a
bag-of-words logistic regression fitted to the same train pairs reaches only 0.544 on test. Beating the floor
on HH-RLHF takes more data and a stronger trunk: the CUDA preset on the full train files, or GPT-2 weights.
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
from model import load_checkpoint, model_from_checkpoint

# ----------------------------------------------------------------------------- config
config = dict(common.SHARED, # out_dir, data_dir, device, block_size, checkpoint_every, resume, ... (common.py)
    sft_ckpt="",             # the trunk to start from; "" = <out_dir>/sft.pt
    n_pairs=2000,            # imdb: train prompts, two SFT answers each, labelled by the gold judge
    n_test_pairs=256,        # imdb: held-out pairs, from test prompts
    max_iters=150,           # optimiser steps (150 x 16 pairs ~ 0.6 epoch of the 4,175 train pairs here)
    batch_size=16,           # pairs per micro-batch (a forward of 2 x batch_size rows)
    grad_accum=1,            # micro-batches per optimiser step (per DDP rank)
    lr=1e-3,                 # peak learning rate (warmup, then cosine to 10%)
    weight_decay=0.1, grad_clip=1.0,  # max gradient norm (0 = off)
    warmup_frac=0.1,         # linear warmup over this fraction of max_iters
    eval_interval=75,        # evaluate on `test` every this many steps (and at the start and the end)
    eval_pairs=0,            # test pairs per evaluation, a fixed random subset (0 = all)
    norm_examples=512,       # train chosen responses (fixed random subset) setting the normalisation (0 = all)
    n_show=4,                # test pairs printed with their scores in the report
)
cuda_config = dict(common.SHARED_CUDA,
    n_pairs=20000, n_test_pairs=1000,  # imdb: more pairs, of the longer answers of the CUDA preset
    max_iters=1500, batch_size=32, lr=2e-5,  # 48k pairs: ~1.2 epochs of imdb's 20k, half of the full HH train
    eval_interval=250, norm_examples=0,
)


# ----------------------------------------------------------------------------- the math
def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry loss, InstructGPT eq. 1 with K = 2:  L = - mean_b log sigmoid(r_w[b] - r_l[b]).
    chosen_rewards, rejected_rewards: (B,) float rewards of the preferred / other response of each pair.
    Returns a scalar. Computed with F.logsigmoid, stable for any difference (never log(sigmoid())), so a
    difference of -1e4 gives a loss of 1e4, not inf. Its gradient raises r_w and lowers r_l."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def ranking_loss(rewards):
    """K-wise comparison loss, InstructGPT section 3.5 / eq. 1:
        L = - 1 / C(K,2) * sum_{i < j} log sigmoid(r_i - r_j), averaged over the prompts,
    for rewards (P, K) of K responses per prompt ORDERED BEST FIRST (response i is preferred to j when
    i < j). Every response is scored once by the caller; all C(K,2) pairs of a prompt are formed here.
    Returns a scalar: the mean of bt_loss over all P * C(K,2) pairs (K = 2 is bt_loss).
    Raises ValueError unless rewards is 2-D with K >= 2."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"ranking_loss wants rewards (P, K) with K >= 2, got shape {tuple(rewards.shape)}")
    K = rewards.shape[1]
    i, j = torch.triu_indices(K, K, offset=1, device=rewards.device)  # (C(K,2),) each: all pairs i < j
    return bt_loss(rewards[:, i].flatten(), rewards[:, j].flatten())  # (P * C(K,2),) pairs


def pair_rewards(score, batch):
    """Rewards of a data.collate_pairs batch: ONE forward of its 2B rows -> (chosen (B,), rejected (B,))."""
    r = score(batch["idx"], batch["attention_mask"])  # (2B,) head at each row's last real token
    B = r.shape[0] // 2
    return r[:B], r[B:]


def accumulate_gradients(score, micro_batches, rt):
    """Forward + backward of one optimiser step over its micro-batches (already on rt.device). Each
    micro-batch's mean bt_loss over its n_i pairs is scaled by n_i / N, N = the pairs of the whole step on
    all DDP ranks (times world_size, because all_reduce_grads then averages the ranks): the gradient is
    that of one mean over every pair of the step, so 1 micro-batch of 8 == 8 micro-batches of 1.
    Returns (loss, accuracy) of the step on this rank, floats."""
    counts = [b["idx"].shape[0] // 2 for b in micro_batches]
    total = common.all_reduce_mean(sum(counts), rt) * rt.world_size  # N
    loss_sum, correct = 0.0, 0.0
    for b, n in zip(micro_batches, counts):
        with rt.autocast():
            chosen, rejected = pair_rewards(score, b)
        loss = bt_loss(chosen.float(), rejected.float())
        (loss * n / total * rt.world_size).backward()
        loss_sum, correct = loss_sum + loss.item() * n, correct + (chosen > rejected).sum().item()
    return loss_sum / sum(counts), correct / sum(counts)


def pair_metrics(chosen, rejected):
    """Pairwise accuracy P(r_w > r_l) (a tie counts 1/2), mean margin r_w - r_l, and bt_loss of (N,) rewards."""
    return dict(accuracy=win_rate(chosen, rejected), margin=(chosen - rejected).mean().item(),
                loss=bt_loss(chosen, rejected).item())


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_pairs(model, examples, rt, batch_size):
    """Rewards of every pair of examples -> (chosen (N,), rejected (N,)) float32 on the CPU."""
    out = [], []
    with common.eval_mode(model):
        for i in range(0, len(examples), batch_size):
            with rt.autocast():
                c, r = pair_rewards(model.score, common.to_device(data.collate_pairs(examples[i:i + batch_size]), rt))
            out[0].append(c.float().cpu())
            out[1].append(r.float().cpu())
    return torch.cat(out[0]), torch.cat(out[1])


@torch.no_grad()
def mean_chosen_reward(model, examples, rt, batch_size):
    """Mean reward of prompt + chosen over the examples (the normalisation target of InstructGPT)."""
    total = 0.0
    with common.eval_mode(model):
        for i in range(0, len(examples), batch_size):
            batch = common.to_device(data.collate_sft(examples[i:i + batch_size]), rt)
            with rt.autocast():
                total += model.score(batch["idx"], batch["attention_mask"]).float().sum().item()  # (B,) summed
    return total / len(examples)


def gold_agreement(pairs, chosen, rejected):
    """imdb: how the reward model's order of each test pair compares with the gold judge's. pairs carry the gold
    scores of both answers; chosen, rejected (N,) the reward model's scores. Returns gold_accuracy = P(the reward
    model prefers the answer the judge scores higher) and label_ceiling = P(the noisy label agrees with the judge),
    ties 1/2."""
    g_c = torch.tensor([p["gold_chosen"] for p in pairs])
    g_r = torch.tensor([p["gold_rejected"] for p in pairs])
    judge_picks_chosen = g_c > g_r
    better = torch.where(judge_picks_chosen, chosen, rejected)  # the reward of the answer the judge prefers
    worse = torch.where(judge_picks_chosen, rejected, chosen)
    return dict(gold_accuracy=win_rate(better, worse), label_ceiling=win_rate(g_c, g_r))


@torch.no_grad()
def pairs_recipe(cfg, sft_path):
    """What the imdb pairs depend on: the SFT checkpoint (its file's size and time) and the sampling settings."""
    return dict(sft=f"{os.path.getsize(sft_path)}:{os.path.getmtime(sft_path)}", n_pairs=cfg.n_pairs,
                n_test_pairs=cfg.n_test_pairs, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)


def same_pairs(cfg, recipe):
    """True when out/<task>/pairs.pt exists and was made by this recipe: reuse it (e.g. a second reward model on the
    same pairs, or a resumed run) instead of sampling again."""
    path = data.tasks.pairs_path(cfg)
    if not os.path.exists(path):
        return False
    info = torch.load(path, weights_only=False).get("info", {})
    if {k: info.get(k) for k in recipe} != recipe:
        return False
    print(f"reusing {path}: made from the same sft.pt with the same settings")
    return True


def make_pairs(policy, task, cfg, rt, recipe):
    """imdb (Ziegler et al. 2019; DPO paper, section 6.1): the preference pairs a human would have labelled. For
    n_pairs train prompts and n_test_pairs test prompts, two answers each from the SFT policy; the gold judge
    labels each pair like a noisy human, the first answer chosen with probability sigmoid(g1 - g2) (Bradley-Terry,
    data.bradley_terry_labels). Pairs of identical answers are dropped. Writes out/imdb/pairs.pt with both gold
    scores of every pair (so a reward model can also be checked against the noiseless order)."""
    t0, pairs, dropped = time.time(), {}, {}
    for split, prompts, n in (("train", task.prompts_train, cfg.n_pairs),
                              ("test", task.prompts_test, cfg.n_test_pairs)):
        prompts = common.subset(prompts, n, cfg.seed)
        answers = [evaluate.generate_answers(policy, prompts, rt, cfg.max_new_tokens, seed=cfg.seed + k,
                                             batch_size=cfg.eval_batch_size) for k in (1, 2)]
        gold = [data.gold_scores(task.judge, [p["prompt"] for p in prompts], a) for a in answers]  # (N,) x2
        first = data.bradley_terry_labels(gold[0], gold[1], torch.Generator().manual_seed(cfg.seed))  # (N,) bool
        pairs[split] = []
        for i, p in enumerate(prompts):
            w, l = (0, 1) if first[i] else (1, 0)
            if answers[0][i] != answers[1][i]:
                pairs[split].append(dict(prompt=p["prompt"], chosen=answers[w][i], rejected=answers[l][i],
                                         gold_chosen=gold[w][i].item(), gold_rejected=gold[l][i].item()))
        dropped[split] = len(prompts) - len(pairs[split])
    data.save_pairs(cfg, pairs, dict(recipe, dropped_identical=dropped))
    print(f"sampled and labelled {len(pairs['train'])} train / {len(pairs['test'])} test pairs (two SFT answers per "
          f"prompt, Bradley-Terry labels from the gold judge; {sum(dropped.values())} identical pairs dropped) in "
          f"{time.time() - t0:.0f} s -> {data.tasks.pairs_path(cfg)}")


def longer_wins(examples):
    """A floor every reward model must beat: accuracy of "the longer response (in tokens) wins", tie = 1/2."""
    c = torch.tensor([len(e["chosen"]) for e in examples], dtype=torch.float32)
    r = torch.tensor([len(e["rejected"]) for e in examples], dtype=torch.float32)
    return pair_metrics(c, r)["accuracy"]


def show_pairs(examples, chosen, rejected, n):
    enc = data.get_tokenizer()
    text = lambda toks: enc.decode([t for t in toks if t != data.EOT]).replace("\n", " ")
    clip = lambda t, k: t if len(t) <= k else t[:k] + "..."
    for e, c, r in list(zip(examples, chosen.tolist(), rejected.tolist()))[:n]:
        print(f"  PROMPT   ...{text(e['prompt'])[-110:]}")
        print(f"    chosen   {c:+7.3f}  {clip(text(e['chosen']), 100)}")
        print(f"    rejected {r:+7.3f}  {clip(text(e['rejected']), 100)}")


# ----------------------------------------------------------------------------- training
def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    rt = common.setup_runtime(cfg)
    t_start = time.time()
    path = os.path.join(cfg.out_dir, "rm.pt")
    ckpt, done = common.resume_checkpoint(cfg, path, "rm", cfg.max_iters)
    if done:
        return common.cleanup(rt) or {}
    sft_path = cfg.sft_ckpt or os.path.join(cfg.out_dir, "sft.pt")
    sft_ckpt = load_checkpoint(sft_path, stage="sft")
    if cfg.block_size > sft_ckpt["model_args"]["block_size"]:
        raise common.UserError(f"--block_size={cfg.block_size} exceeds the block_size "
                               f"{sft_ckpt['model_args']['block_size']} of {sft_path}")
    task = data.load_task(cfg, verbose=rt.master)
    recipe = pairs_recipe(cfg, sft_path)
    if task.judge is not None and not same_pairs(cfg, recipe):
        if rt.master:  # imdb: the pairs are made here, from the SFT policy's answers and the judge's labels
            make_pairs(model_from_checkpoint(sft_ckpt).to(rt.device), task, cfg, rt, recipe)
        if rt.ddp:
            torch.distributed.barrier()
    train, test = data.load_pairs(cfg, task)
    torch.manual_seed(cfg.seed)  # the same fresh head on every DDP rank
    model = model_from_checkpoint(sft_ckpt, scalar_head=True).to(rt.device).train()  # SFT trunk + fresh head
    del sft_ckpt
    score = torch.compile(model.score) if cfg.compile else model.score
    test_eval = common.subset(test, cfg.eval_pairs)
    gen = torch.Generator().manual_seed(cfg.seed + rt.rank)  # each rank samples its own batches
    optimizer, state, start, logger = common.start_training(model, cfg, rt, ckpt, "rm", dict(gen=gen))
    if rt.master:
        print(f"reward model: {sft_path} trunk + fresh scalar head, {model.num_params() / 1e6:.2f}M parameters; "
              f"{len(train)} train / {len(test)} test pairs")

    def run_eval(step):
        c, r = score_pairs(model, test_eval, rt, cfg.eval_batch_size)
        m = pair_metrics(c, r)
        print(f"\nstep {step}: test accuracy {m['accuracy']:.3f}, margin {m['margin']:+.3f}, loss {m['loss']:.4f}")
        logger.log(step, **{f"test_{k}": v for k, v in m.items()})
        return m, c, r

    before = run_eval(start)[0] if rt.master else None
    losses = []
    warmup = max(1, int(cfg.warmup_frac * cfg.max_iters))
    bar = tqdm(range(start, cfg.max_iters), disable=not rt.master, desc="reward", dynamic_ncols=True)
    for step in bar:
        lr = common.lr_at(step, cfg.max_iters, cfg.lr, warmup)
        common.set_lr(optimizer, lr)
        micro = [data.collate_pairs([train[i] for i in torch.randint(len(train), (cfg.batch_size,),
                                                                     generator=gen)]) for _ in range(cfg.grad_accum)]
        micro = [common.to_device(b, rt) for b in micro]
        loss, acc = accumulate_gradients(score, micro, rt)
        common.check_finite(step, loss=loss)
        grad_norm = common.optimizer_step(model, optimizer, cfg.grad_clip, rt, step)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        logger.log(step, loss=loss, accuracy=acc, lr=lr, grad_norm=grad_norm)
        periodic = cfg.eval_interval > 0 and (step + 1) % cfg.eval_interval == 0
        if rt.master and periodic and step + 1 < cfg.max_iters:
            run_eval(step + 1)
        if step + 1 < cfg.max_iters and common.checkpoint_due(step + 1, cfg, cfg.max_iters):  # the last: below
            common.save_training_state(path, "rm", cfg, step + 1, cfg.max_iters, rt, **state)
    bar.close()

    report = {}
    if rt.master:
        after, c, r = run_eval(cfg.max_iters)
        # InstructGPT normalisation: shift the head's bias so the train chosen responses have mean reward 0
        norm = common.subset(train, cfg.norm_examples)
        mean = mean_chosen_reward(model, norm, rt, cfg.eval_batch_size)
        with torch.no_grad():
            model.scalar_head.bias -= mean
        c, r = c - mean, r - mean  # the same rewards, normalised (accuracy and margin do not change)
        logger.plot()
    common.save_training_state(path, "rm", cfg, cfg.max_iters, cfg.max_iters, rt, **state,
                               reward_bias=-mean if rt.master else None)  # normalised: finished
    if rt.master:
        floor = longer_wins(test_eval)
        report = dict(**{f"{k}_before": v for k, v in before.items()},
                      **{f"{k}_after": v for k, v in after.items()}, longer_wins=floor, reward_bias=-mean)
        if losses:
            report.update(train_loss_first=sum(losses[:10]) / len(losses[:10]),
                          train_loss_last=sum(losses[-10:]) / len(losses[-10:]))
        pairs = cfg.batch_size * cfg.grad_accum * rt.world_size
        print(f"\n=== reward model report ({cfg.max_iters} steps x {pairs} pairs, {time.time() - t_start:.0f} s) ===")
        if losses:
            print(f"  train loss {report['train_loss_first']:.4f} -> {report['train_loss_last']:.4f} "
                  "(mean of the first 10 steps -> of the last 10)")
        print(f"  test pairs: {len(test_eval)}")
        for k in ("accuracy", "margin", "loss"):
            print(f"  test {k:8s} {before[k]:+.4f} -> {after[k]:+.4f}")
        print(f"  floor 'the longer response wins' on the same pairs: {floor:.3f} (shorter wins {1 - floor:.3f})")
        if "gold_chosen" in test_eval[0]:  # imdb: the truth behind the noisy labels
            report.update(gold_agreement(test_eval, c, r))
            print(f"  against the gold judge: the reward model orders {report['gold_accuracy']:.3f} of the test pairs "
                  f"as the judge does (noiseless gold order); the noisy labels themselves agree with the judge on "
                  f"{report['label_ceiling']:.3f} (the ceiling of the accuracy above)")
        print(f"  normalisation: mean reward of {len(norm)} train chosen responses was {mean:+.4f}; "
              f"scalar_head.bias shifted by {-mean:+.4f} (ckpt['reward_bias'])")
        print("  test pairs (normalised rewards):")
        show_pairs(test_eval, c, r, cfg.n_show)
        print(f"  wrote {cfg.out_dir}/rm.pt, rm_log.jsonl, rm.png")
    common.cleanup(rt)
    return report


if __name__ == "__main__":
    common.cli(main)
