"""
The two tasks behind one interface, so that every stage reads `--task=imdb|hh` the same way.

    task = data.load_task(cfg)      # cfg: the stage's config (task, data_dir, block_size, max_prompt_len, vocab_size)

imdb (the default): IMDb controlled sentiment (Ziegler et al. 2019; DPO paper, section 6.1). The text to learn
    from is 75,000 reviews; prompts are the first 2-8 tokens of a review (train reviews for training, test reviews
    for every evaluation); the comparisons are NOT given: reward.py samples K answers per train prompt from the SFT
    policy and the gold judge ranks them with Plackett-Luce noise (data/imdb.py), into out/imdb/comparisons.pt.
    The judge, the stand-in for the human labeller, also scores every policy: the truth a reward model is checked
    against.
hh: Anthropic HH-RLHF, real human comparisons (K = 2); no gold judge.

A comparison is a ranking: dict(prompt=tokens, responses=[K token lists, best first]) and, on imdb,
gold=[the K gold scores]. The reward model trains on rankings (all C(K,2) pairs of a prompt in one batch); DPO
and the held-out figures use the pairs of a ranking (ranking_pairs).
"""
import os
from types import SimpleNamespace

import torch

from common import UserError, atomic_write
from data.hh_rlhf import load_hh_rlhf, pretraining_tokens
from data.imdb import biased_labeller_scores, load_imdb, plackett_luce_ranking
from data.judge import load_judge
from data.tokenizer import check_vocab_size, decode

TASKS = ("imdb", "hh")


def load_task(cfg, verbose=True):
    """Everything a stage reads of its task, as a SimpleNamespace:
      name                         "imdb" or "hh"
      vocab_size                   tokens of the vocabulary every token list below is in (cfg.vocab_size)
      sft_train, sft_test          examples with "prompt" and "chosen" token lists (data.collate_sft)
      prompts_train, prompts_test  examples with a "prompt" (data.collate_prompts): training / every evaluation
      rankings_train, rankings_test  hh's human comparisons as rankings (K = 2); for imdb None here:
                                   data.load_rankings reads the comparisons reward.py sampled
      text                         (N,) LongTensor, the pretraining text (EOT-separated documents)
      judge                        the gold judge (imdb; data.judge.GoldJudge) or None (hh)
    Raises UserError for an unknown task, a bad vocab_size or missing / malformed data."""
    if cfg.task not in TASKS:
        raise UserError(f"--task={cfg.task}: expected one of {', '.join(TASKS)}")
    check_vocab_size(cfg.vocab_size)  # before reading any data
    if cfg.task == "hh":
        splits = load_hh_rlhf(cfg.data_dir or None, block_size=cfg.block_size, max_prompt_len=cfg.max_prompt_len,
                              verbose=verbose, vocab_size=cfg.vocab_size)
        train, test = splits["train"], splits["test"]
        as_ranking = lambda pairs: [dict(prompt=p["prompt"], responses=[p["chosen"], p["rejected"]]) for p in pairs]
        return SimpleNamespace(name="hh", vocab_size=cfg.vocab_size, sft_train=train, sft_test=test,
                               prompts_train=train, prompts_test=test, rankings_train=as_ranking(train),
                               rankings_test=as_ranking(test), text=pretraining_tokens(train, cfg.vocab_size),
                               judge=None)
    d = load_imdb(cfg.data_dir or None, verbose=verbose, vocab_size=cfg.vocab_size)
    return SimpleNamespace(name="imdb", vocab_size=cfg.vocab_size, sft_train=d["sft_train"], sft_test=d["sft_test"],
                           prompts_train=d["train_prompts"], prompts_test=d["test_prompts"], rankings_train=None,
                           rankings_test=None, text=d["text_tokens"],
                           judge=load_judge(cfg.data_dir or None, verbose=verbose))


def gold_scores(judge, prompts, responses, vocab_size):
    """The gold reward g(x, y) of each answer: the judge's log-odds that the text prompt + response is a positive
    review. prompts, responses: lists of N token lists of a vocabulary of vocab_size tokens (an EOT is dropped).
    Returns (N,) float32."""
    return judge.log_odds([decode(p + r, vocab_size) for p, r in zip(prompts, responses)])


def rankings_path(cfg):
    return os.path.join(cfg.out_dir, "comparisons.pt")


def save_rankings(cfg, rankings, info):
    """Write the sampled and ranked comparisons (dict "train"/"test" -> list of rankings) to
    out/<task>/comparisons.pt, atomically, with `info` (how they were made)."""
    with atomic_write(rankings_path(cfg)) as tmp:
        torch.save(dict(rankings, info=info), tmp)


def load_rankings(cfg, task):
    """The task's comparisons as (train, test) lists of rankings: hh's own; for imdb those in
    out/imdb/comparisons.pt, each also holding the gold scores of its answers ("gold"). Raises UserError when
    reward.py has not made them yet, or the file is damaged."""
    if task.rankings_train is not None:
        return task.rankings_train, task.rankings_test
    path = rankings_path(cfg)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: `python reward.py --task={task.name}` samples and ranks the comparisons")
    try:
        blob = torch.load(path, weights_only=False)
        return blob["train"], blob["test"]
    except Exception as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); `python reward.py --task={task.name}` "
                        "writes it again") from None


def ranking_pairs(rankings, which="all"):
    """The preference pairs of rankings, as dicts prompt / chosen / rejected (and gold_chosen / gold_rejected where
    the ranking has gold scores). which="all": every one of the C(K,2) pairs (i, j), i ranked above j, in the order
    (0,1), (0,2), ..., (1,2), ...; "best_worst": only (first, last), one pair per prompt."""
    if which not in ("all", "best_worst"):
        raise ValueError(f"ranking_pairs: which={which!r}, expected 'all' or 'best_worst'")
    out = []
    for r in rankings:
        K = len(r["responses"])
        index_pairs = [(0, K - 1)] if which == "best_worst" else [(i, j) for i in range(K) for j in range(i + 1, K)]
        for i, j in index_pairs:
            pair = dict(prompt=r["prompt"], chosen=r["responses"][i], rejected=r["responses"][j])
            if "gold" in r:
                pair.update(gold_chosen=r["gold"][i], gold_rejected=r["gold"][j])
            out.append(pair)
    return out


def relabel_rankings(rankings, weight, feature, vocab_size, temperature=0.0, generator=None):
    """imdb: the same answers as ranked by a labeller with a bias (data.imdb.biased_labeller_scores: the judge's
    log-odds + weight per occurrence of `feature` in the answer), drawn by Plackett-Luce at `temperature` (0: that
    labeller's own order). rankings: imdb rankings (they carry "gold"), K answers each. Returns new rankings, each
    with its responses and gold re-ordered best first for that labeller and "labeller" = the labeller's scores in
    that order. weight 0 at temperature 0 gives back the judge's order (a stable sort of tied scores keeps the
    stored order)."""
    gold = torch.tensor([r["gold"] for r in rankings], dtype=torch.float64)  # (P, K)
    answers = [[decode(y, vocab_size) for y in r["responses"]] for r in rankings]
    scores = biased_labeller_scores(gold, answers, weight, feature)  # (P, K)
    order = plackett_luce_ranking(scores, temperature, generator)  # (P, K) best first
    return [dict(r, responses=[r["responses"][k] for k in o], gold=[r["gold"][k] for k in o],
                 labeller=[s[k].item() for k in o]) for r, o, s in zip(rankings, order.tolist(), scores)]
