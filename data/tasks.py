"""
The two tasks behind one interface, so that every stage reads `--task=imdb|hh` the same way.

    task = data.load_task(cfg)      # cfg: the stage's config (task, data_dir, block_size, max_prompt_len)

imdb (the default): IMDb controlled sentiment (Ziegler et al. 2019; DPO paper, section 6.1). The text to learn
    from is 75,000 reviews; prompts are the first 2-8 tokens of a review (train reviews for training, test reviews
    for every evaluation); the preference pairs are NOT given: reward.py samples two answers per train prompt from
    the SFT policy and the gold judge labels them with Bradley-Terry noise (data/imdb.py), into out/imdb/pairs.pt.
    The judge, the stand-in for the human labeller, also scores every policy: the truth a reward model is checked
    against.
hh: Anthropic HH-RLHF, real human comparisons; no gold judge.
"""
import os
from types import SimpleNamespace

import torch

from common import UserError, atomic_write
from data.hh_rlhf import decode, load_hh_rlhf, pretraining_tokens
from data.imdb import load_imdb
from data.judge import load_judge

TASKS = ("imdb", "hh")


def load_task(cfg, verbose=True):
    """Everything a stage reads of its task, as a SimpleNamespace:
      name                         "imdb" or "hh"
      sft_train, sft_test          examples with "prompt" and "chosen" token lists (data.collate_sft)
      prompts_train, prompts_test  examples with a "prompt" (data.collate_prompts): training / every evaluation
      pairs_train, pairs_test      preference pairs ("prompt", "chosen", "rejected"): hh's human comparisons;
                                   for imdb None here: data.load_pairs reads the pairs reward.py sampled
      text                         (N,) LongTensor, the pretraining text (EOT-separated documents)
      judge                        the gold judge (imdb; data.judge.GoldJudge) or None (hh)
    Raises UserError for an unknown task or missing / malformed data."""
    if cfg.task not in TASKS:
        raise UserError(f"--task={cfg.task}: expected one of {', '.join(TASKS)}")
    if cfg.task == "hh":
        splits = load_hh_rlhf(cfg.data_dir or None, block_size=cfg.block_size, max_prompt_len=cfg.max_prompt_len,
                              verbose=verbose)
        train, test = splits["train"], splits["test"]
        return SimpleNamespace(name="hh", sft_train=train, sft_test=test, prompts_train=train, prompts_test=test,
                               pairs_train=train, pairs_test=test, text=pretraining_tokens(train), judge=None)
    d = load_imdb(cfg.data_dir or None, verbose=verbose)
    return SimpleNamespace(name="imdb", sft_train=d["sft_train"], sft_test=d["sft_test"],
                           prompts_train=d["train_prompts"], prompts_test=d["test_prompts"], pairs_train=None,
                           pairs_test=None, text=d["text_tokens"], judge=load_judge(cfg.data_dir or None,
                                                                                    verbose=verbose))


def gold_scores(judge, prompts, responses):
    """The gold reward g(x, y) of each answer: the judge's log-odds that the text prompt + response is a positive
    review. prompts, responses: lists of N token lists (an EOT is dropped). Returns (N,) float32."""
    return judge.log_odds([decode(p + r) for p, r in zip(prompts, responses)])


def pairs_path(cfg):
    return os.path.join(cfg.out_dir, "pairs.pt")


def save_pairs(cfg, pairs, info):
    """Write the sampled and labelled pairs (dict "train"/"test" -> list of pair dicts) to out/<task>/pairs.pt,
    atomically, with `info` (how they were made)."""
    with atomic_write(pairs_path(cfg)) as tmp:
        torch.save(dict(pairs, info=info), tmp)


def load_pairs(cfg, task):
    """The task's preference pairs as (train, test) lists: hh's own; for imdb those in out/imdb/pairs.pt, each pair
    also holding the gold scores of its two answers ("gold_chosen", "gold_rejected"). Raises UserError when
    reward.py has not made them yet."""
    if task.pairs_train is not None:
        return task.pairs_train, task.pairs_test
    path = pairs_path(cfg)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: `python reward.py --task={task.name}` samples and labels the pairs")
    try:
        blob = torch.load(path, weights_only=False)
        return blob["train"], blob["test"]
    except Exception as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); `python reward.py --task={task.name}` "
                        "writes it again") from None
