"""The data package: the two tasks and what every stage needs to batch them.
- data/tokenizer.py: GPT-2's BPE, whole or cut to the task vocabulary, its end-of-text id, decoding, and the
  collate functions every task uses;
- data/hh_rlhf.py: Anthropic HH-RLHF (reading, prompt/response split, tokenising, disk cache);
- data/imdb.py: the IMDb reviews (prompts that are review prefixes, the text to learn from) and the
  labellers of sampled answers (Plackett-Luce, and one with a bias);
- data/judge.py: the gold sentiment judge of the imdb task;
- data/tasks.py: both tasks behind one interface (load_task), and the imdb comparisons file.
This file re-exports their public names."""
from .hh_rlhf import SUBSETS, find_files, load_hh_rlhf, pretraining_tokens, read_pairs, split_dialogue, tokenize_pairs
from .imdb import (biased_labeller_scores, find_archive, load_imdb, make_examples, plackett_luce_ranking, prompt_length,
                   read_reviews)
from .judge import GoldJudge, load_judge
from .tasks import TASKS, gold_scores, load_rankings, load_task, ranking_pairs, relabel_rankings, save_rankings
from .tokenizer import (EOT, GPT2_VOCAB, PAD_ID, collate_pairs, collate_prompts, collate_rankings, collate_sft,
                        decode, eot_id, get_tokenizer, sample_text_batch)
