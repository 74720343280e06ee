"""The data package: HH-RLHF reading, prompt/response split, tokenising, disk cache and collate
functions. Everything lives in data/hh_rlhf.py; this file re-exports its public names."""
from .hh_rlhf import (EOT, PAD_ID, SUBSETS, collate_pairs, collate_prompts, collate_sft, decode, find_files,
                      get_tokenizer, load_hh_rlhf, pretraining_tokens, read_pairs, sample_text_batch,
                      split_dialogue, tokenize_pairs)

__all__ = ["EOT", "PAD_ID", "SUBSETS", "collate_pairs", "collate_prompts", "collate_sft", "decode", "find_files",
           "get_tokenizer", "load_hh_rlhf", "pretraining_tokens", "read_pairs", "sample_text_batch",
           "split_dialogue", "tokenize_pairs"]
