"""The data package: the two tasks and what every stage needs to batch them.
- data/hh_rlhf.py: Anthropic HH-RLHF (reading, prompt/response split, tokenising, disk cache) and the collate
  functions every task uses;
- data/imdb.py: the IMDb reviews (prompts that are review prefixes, the text to learn from) and the
  Bradley-Terry labelling of sampled pairs;
- data/judge.py: the gold sentiment judge of the imdb task;
- data/tasks.py: both tasks behind one interface (load_task), and the imdb pairs file.
This file re-exports their public names."""
from .hh_rlhf import (EOT, PAD_ID, SUBSETS, collate_pairs, collate_prompts, collate_sft, decode, find_files,
                      get_tokenizer, load_hh_rlhf, pretraining_tokens, read_pairs, sample_text_batch,
                      split_dialogue, tokenize_pairs)
from .imdb import bradley_terry_labels, find_archive, load_imdb, make_examples, prompt_length, read_reviews
from .judge import GoldJudge, load_judge
from .tasks import TASKS, gold_scores, load_pairs, load_task, save_pairs

__all__ = ["EOT", "PAD_ID", "SUBSETS", "collate_pairs", "collate_prompts", "collate_sft", "decode", "find_files",
           "get_tokenizer", "load_hh_rlhf", "pretraining_tokens", "read_pairs", "sample_text_batch",
           "split_dialogue", "tokenize_pairs", "bradley_terry_labels", "find_archive", "load_imdb",
           "make_examples", "prompt_length", "read_reviews", "GoldJudge", "load_judge", "TASKS", "gold_scores",
           "load_pairs", "load_task", "save_pairs"]
