"""
Tokens and batches, for every task: the tokenizer (GPT-2's BPE, whole or cut to a small vocabulary), its
end-of-text id, decoding, and the collate functions that turn token lists into padded tensors.

The task vocabulary. The CPU model is small (width 128), so an output layer over GPT-2's 50,257 tokens is most
of its FLOPs. `vocab_size` = V < 50,257 cuts GPT-2's BPE to its first V - 1 merge ranks (the 256 bytes and the
first V - 257 merges) and puts <|endoftext|> at the last id, V - 1. That is a true BPE (tiktoken builds it from
the ranks): every text round-trips exactly, and each id below V - 1 is the same token as in GPT-2, so the
cut vocabulary costs only length (3,000 IMDb reviews: V = 8,192 gives 1.18x the tokens of the full BPE, 4,096
1.30x) while every token is ~3.5x cheaper to train on, sample and score for the CPU model. TinyStories
(Eldan and Li 2023) kept the top 10k tokens of its tokenizer for the same reason. V = 50,257 is GPT-2's own,
which GPT-2 weights (--init_from=gpt2) need.

Batches: masks are float32 0/1 aligned to token positions; target_mask[:, t] = 1 means token t is a target (its
logprob / loss counts).
"""
from functools import lru_cache

import torch

from common import UserError

GPT2_VOCAB = 50257  # tokens of GPT-2's BPE, <|endoftext|> included
EOT = GPT2_VOCAB - 1  # GPT-2's <|endoftext|> (50256); a cut vocabulary's is eot_id(vocab_size)
PAD_ID = 0  # default pad id; no code may rely on its value (the masks say what is real)
MIN_VOCAB = 257  # the 256 byte tokens + <|endoftext|>: every text can still be encoded


def eot_id(vocab_size=GPT2_VOCAB):
    """The <|endoftext|> id of a vocabulary of vocab_size tokens: its last id, vocab_size - 1."""
    return vocab_size - 1


def check_vocab_size(vocab_size):
    """UserError unless MIN_VOCAB <= vocab_size <= GPT2_VOCAB."""
    if not MIN_VOCAB <= vocab_size <= GPT2_VOCAB:
        raise UserError(f"--vocab_size={vocab_size}: expected {MIN_VOCAB} (the bytes + <|endoftext|>) to "
                        f"{GPT2_VOCAB} (GPT-2's whole BPE)")


@lru_cache(maxsize=None)
def get_tokenizer(vocab_size=GPT2_VOCAB):
    """GPT-2's BPE as a tiktoken Encoding of vocab_size tokens: the whole of it (tiktoken "gpt2") for 50,257, else
    its first vocab_size - 1 merge ranks plus <|endoftext|> = vocab_size - 1 (see the module docstring).
    Raises UserError for a bad vocab_size, or if GPT-2's BPE files can be neither read from TIKTOKEN_CACHE_DIR
    nor downloaded."""
    import tiktoken
    check_vocab_size(vocab_size)
    try:
        if vocab_size == GPT2_VOCAB:
            return tiktoken.get_encoding("gpt2")
        from tiktoken_ext.openai_public import gpt2
        base = gpt2()  # {"pat_str", "mergeable_ranks": bytes -> rank, ...}, from the same cached files
    except Exception as e:  # tiktoken raises requests' errors when offline with no cache
        raise UserError("could not load the GPT-2 BPE (tiktoken 'gpt2'): offline, set TIKTOKEN_CACHE_DIR to a "
                        f"folder holding tiktoken's cached gpt2 files ({type(e).__name__})") from None
    ranks = {token: rank for token, rank in base["mergeable_ranks"].items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name=f"gpt2_v{vocab_size}", pat_str=base["pat_str"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot_id(vocab_size)})


def decode(tokens, vocab_size=GPT2_VOCAB):
    """Text of a token list (an answer) of a vocabulary of vocab_size tokens, without its <|endoftext|>: what
    every report prints and what the gold judge reads."""
    eot = eot_id(vocab_size)
    return get_tokenizer(vocab_size).decode([t for t in tokens if t != eot])


def _pad(rows, pad_id, left=False):
    """rows: list of token lists -> (idx (B, T) long, attention_mask (B, T) float32), T = longest row."""
    if not rows:
        raise ValueError("cannot collate an empty list of examples")
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.float32)
    for i, r in enumerate(rows):
        s = slice(T - len(r), T) if left else slice(0, len(r))
        idx[i, s] = torch.tensor(r, dtype=torch.long)
        mask[i, s] = 1.0
    return idx, mask


def _response_batch(prompts, responses, pad_id):
    """Right-padded prompt+response rows and a target mask that is 1 on the response tokens."""
    idx, attention_mask = _pad([p + r for p, r in zip(prompts, responses)], pad_id)
    target_mask = torch.zeros_like(attention_mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        target_mask[i, max(len(p), 1):len(p) + len(r)] = 1.0  # token 0 is never a target
    return idx, attention_mask, target_mask


def collate_sft(examples, pad_id=PAD_ID):
    """SFT batch of prompt + chosen, right-padded. Returns dict idx (B, T) long, attention_mask (B, T)
    float32 (1 on real tokens), target_mask (B, T) float32 (1 on chosen-response tokens: targets)."""
    idx, am, target_mask = _response_batch([e["prompt"] for e in examples], [e["chosen"] for e in examples], pad_id)
    return dict(idx=idx, attention_mask=am, target_mask=target_mask)


def collate_pairs(examples, pad_id=PAD_ID):
    """Preference batch: rows [:B] prompt + chosen, rows [B:] prompt + rejected, right-padded to one T.
    Returns dict idx (2B, T) long, attention_mask (2B, T) float32, target_mask (2B, T) float32 (1 on the
    responses: the targets)."""
    prompts = [e["prompt"] for e in examples] * 2
    responses = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    idx, am, target_mask = _response_batch(prompts, responses, pad_id)
    return dict(idx=idx, attention_mask=am, target_mask=target_mask)


def collate_prompts(examples, pad_id=PAD_ID):
    """Prompts for generation, LEFT-padded. Returns dict idx (B, P) long, attention_mask (B, P) float32."""
    idx, am = _pad([e["prompt"] for e in examples], pad_id, left=True)
    return dict(idx=idx, attention_mask=am)


def sample_text_batch(stream, batch_size, block_size, generator=None):
    """batch_size random contiguous windows of block_size tokens of stream (N,) (nanoGPT's get_batch).
    Returns dict idx (B, block_size) long, attention_mask (B, block_size) float32 (all 1), target_mask
    (B, block_size) float32 (1 everywhere but token 0, which has no context). Raises UserError if
    the stream is shorter than block_size."""
    if len(stream) < block_size:
        raise UserError(f"text stream has {len(stream)} tokens, fewer than block_size {block_size}")
    ix = torch.randint(len(stream) - block_size + 1, (batch_size,), generator=generator)  # (B,)
    idx = stream[ix[:, None] + torch.arange(block_size)]  # (B, T)
    target_mask = torch.ones(batch_size, block_size)
    target_mask[:, 0] = 0.0
    return dict(idx=idx, attention_mask=torch.ones(batch_size, block_size), target_mask=target_mask)




def collate_rankings(examples, pad_id=PAD_ID):
    """K-wise comparison batch (InstructGPT section 3.5): P examples with a "prompt" and K "responses" (the same K
    for all, best first) -> P * K rows, example i's response k at row i * K + k, each response forwarded once.
    Returns dict idx (P*K, T) long, attention_mask (P*K, T) float32, target_mask (P*K, T) float32 (1 on the
    responses: the targets)."""
    K = len(examples[0]["responses"])
    if any(len(e["responses"]) != K for e in examples):
        raise ValueError("collate_rankings needs the same number of responses in every example")
    prompts = [e["prompt"] for e in examples for _ in range(K)]
    idx, am, target_mask = _response_batch(prompts, [r for e in examples for r in e["responses"]], pad_id)
    return dict(idx=idx, attention_mask=am, target_mask=target_mask)
