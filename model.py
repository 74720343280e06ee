"""
The GPT used by every stage: a nanoGPT-style GPT-2 (learned positions, pre-LayerNorm blocks, GELU MLP,
tied input/output embeddings, F.scaled_dot_product_attention) plus what RLHF needs on top of it:
- left-padded batches (attention mask + position ids derived from it), so a batch of prompts of
  different lengths gives the same logits and greedy tokens as each prompt alone;
- generation with a preallocated KV cache, temperature, per-row EOS and early exit, and an
  exact inverse-CDF sampler (torch.multinomial over 50k tokens costs more than a model step on CPU);
- an optional scalar head (reward model / critic): one number per token;
- per-token logprobs that compute logits only where they are needed.
This is the readable reference; the speed machinery (torch.compile of the logprobs, generation with a static cache
replayed as a CUDA graph) is in speed.py, tested against it. It imports torch and nothing of the pipeline:
checkpoints live in checkpoint.py, GPT-2 weights in gpt2.py.
Conventions: masks are 0/1 with 1 on real tokens; a target_mask is aligned to token positions,
target_mask[:, t] = 1 meaning "token t is predicted from tokens < t" (its logprob counts).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_TOKENS = 50257  # GPT-2's vocabulary (tiktoken "gpt2"), <|endoftext|> its last id


def padded_vocab_size(n_tokens):
    """Rows of the embedding for n_tokens real tokens: n_tokens rounded up to a multiple of 64 (50257 -> 50304),
    which the matrix kernels run faster on; the extra ids are never sampled (GPT.lm_logits)."""
    return 64 * math.ceil(n_tokens / 64)


@dataclass
class GPTConfig:
    block_size: int = 256
    padded_vocab_size: int = 50304  # rows of the embedding: n_tokens padded up to a multiple of 64 (50257 -> 50304)
    n_tokens: int = GPT2_TOKENS  # real tokens; <|endoftext|> is the last, n_tokens - 1; ids >= n_tokens are padding
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    scalar_head: bool = False  # adds Linear(n_embd, 1): reward model / critic


# ----------------------------------------------------------------------------------------------------
# masks and positions

def position_ids(attention_mask):
    """Position of each token among the real tokens of its row: (B, T) 0/1 mask -> (B, T) long.
    Pads get position 0 (left padding) or repeat the last position (right padding); neither is read."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask):
    """Index of the last 1 in each row of a (B, T) 0/1 mask (left or right padding) -> (B,) long.
    A row with no 1 gives 0."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, 0).amax(-1)


def _attention_mask_4d(attention_mask, T):
    """(B, L) key mask -> (B, 1, T, L) bool, True = may attend, for the last T of L positions as queries:
    causal AND key is real, OR key is the query itself (so a row of pads never gives NaN)."""
    L = attention_mask.shape[1]
    q = torch.arange(L - T, L, device=attention_mask.device)[:, None]  # (T, 1)
    k = torch.arange(L, device=attention_mask.device)[None, :]  # (1, L)
    keep = (k <= q) & attention_mask.bool()[:, None, :]  # (B, T, L)
    return (keep | (k == q))[:, None]  # (B, 1, T, L)


class KVCache:
    """Keys and values of every layer, preallocated at full length and written in place."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.k, self.v = max_len, [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v, start):
        """Write k, v (B, nh, T, hs) at [start, start+T); return the keys/values of [0, start+T)."""
        if self.k[layer] is None:  # allocated at the first write, in the dtype autocast computes in
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------------------------------
# the network (nanoGPT)

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, mask, cache=None, layer=0, start=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, nh, start+T, hs)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.scalar_head = nn.Linear(config.n_embd, 1) if config.scalar_head else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: scale residual projections by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Number of parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, attention_mask=None, cache=None, start=0):
        """Final hidden states (after ln_f). idx (B, T) long; attention_mask (B, start+T) 0/1 or None
        (None: every token real, causal fast path). With a KVCache, idx are positions [start, start+T)
        and the mask covers [0, start+T). Returns (B, T, C) (float32, or bf16 under autocast).
        Raises ValueError if start + T > block_size."""
        B, T = idx.shape
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        if attention_mask is None and cache is not None:
            attention_mask = torch.ones(B, start + T, device=idx.device)
        if attention_mask is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # (1, T)
        else:
            pos, mask = position_ids(attention_mask)[:, start:], _attention_mask_4d(attention_mask, T)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, start)
        return self.transformer.ln_f(x)  # (B, T, C)

    def lm_logits(self, h):
        """Tied output head: h (..., C) -> logits (..., V) float32. The ids past the n_tokens real tokens
        (padded_vocab_size rows, a multiple of 64 for speed) are not tokens: their logit is -1e9, so they are
        never sampled and carry no probability (a finite value keeps 0 * log 0 = 0 in the entropy)."""
        logits = self.lm_head(h).float()
        if self.config.n_tokens < self.config.padded_vocab_size:
            logits[..., self.config.n_tokens:] = -1e9
        return logits

    @property
    def eot_id(self):
        """The id of <|endoftext|> in this model's vocabulary: its last real token, n_tokens - 1."""
        return self.config.n_tokens - 1

    def forward(self, idx, attention_mask=None):
        """Full logits: idx (B, T) long, attention_mask (B, T) 0/1 or None -> (B, T, V) float32.
        logits[:, t] predicts token t+1. Raises ValueError if T > block_size."""
        return self.lm_logits(self.hidden_states(idx, attention_mask))  # (B, T, V)

    def scalar(self, idx, attention_mask=None):
        """Scalar head (reward / value) at every position: (B, T) long -> (B, T) float32. Read a sequence's
        reward at last_token_index(attention_mask). Raises RuntimeError without a scalar head."""
        return self._head()(self.hidden_states(idx, attention_mask)).squeeze(-1).float()  # (B, T)

    def score(self, idx, attention_mask):
        """Reward of each whole sequence: the scalar head at the last real token (r_theta(x, y) of
        InstructGPT eq. 1). idx (B, T) long, attention_mask (B, T) 0/1 -> (B,) float32. Raises RuntimeError
        without a scalar head."""
        head = self._head()
        h = self.hidden_states(idx, attention_mask)  # (B, T, C)
        h = h[torch.arange(idx.shape[0], device=idx.device), last_token_index(attention_mask)]  # (B, C)
        return head(h).squeeze(-1).float()  # (B,)

    def _head(self):
        if self.scalar_head is None:
            raise RuntimeError("this GPT has no scalar head (GPTConfig.scalar_head=False); build it with "
                               "scalar_head=True or model_from_checkpoint(ckpt, scalar_head=True)")
        return self.scalar_head

    def logprobs(self, idx, attention_mask, target_mask, temperature=1.0, return_entropy=False):
        """Per-token log pi(idx[:, t] | idx[:, :t]) with pi = softmax(logits / temperature).
        idx (B, T) long; attention_mask, target_mask (B, T) 0/1 (target_mask[:, 0] is ignored: token 0
        has no prediction). Logits are computed only at the targets' predicting positions. Returns
        logprobs (B, T) float32, 0 where target_mask is 0, and with return_entropy also the entropy
        -sum_v p_v log p_v (B, T) of each of those distributions."""
        h = self.hidden_states(idx, attention_mask)[:, :-1]  # (B, T-1, C): h[:, t-1] predicts token t
        sel = target_mask[:, 1:].bool()  # (B, T-1)
        lp, ent = self.token_logprobs(h[sel], idx[:, 1:][sel], temperature, return_entropy)  # (N,) x2
        full = F.pad(sel, (1, 0))  # (B, T): back on token positions
        out = lp.new_zeros(idx.shape).masked_scatter(full, lp)  # (B, T)
        if not return_entropy:
            return out
        return out, lp.new_zeros(idx.shape).masked_scatter(full, ent)

    def token_logprobs(self, h, targets, temperature=1.0, return_entropy=False):
        """log pi(target | h) from hidden states: h (..., C), targets (...) long -> (logprobs (...) float32,
        entropy (...) or None without return_entropy). The one softmax of logprobs (and of speed.answer_logprobs)."""
        logits = self.lm_logits(h)  # (..., V)
        if temperature != 1.0:  # skip a pass over (..., V) when it changes nothing
            logits = logits / temperature
        logp = F.log_softmax(logits, dim=-1)  # (..., V)
        lp = logp.gather(-1, targets[..., None]).squeeze(-1)  # (...)
        ent = -(logp.exp() * logp).sum(-1) if return_entropy else None  # H = -sum_v p_v log p_v
        return lp, ent

    def check_generation_fits(self, P, max_new_tokens):
        """Raise ValueError if a prompt of P tokens plus max_new_tokens exceeds block_size (generate's check)."""
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds "
                             f"block_size {self.config.block_size}")

    @torch.no_grad()
    def generate(self, idx, attention_mask, max_new_tokens, temperature=1.0,
                 eos_token_id="eot", generator=None, use_cache=True, return_logits=False):
        """Sample continuations of LEFT-padded prompts. idx (B, P) long; attention_mask (B, P) 0/1 (None:
        no padding). temperature 0 means greedy; eos_token_id "eot" stops at the model's <|endoftext|>
        (self.eot_id), an int at that id, None never. With use_cache=False
        every step recomputes the whole forward (for tests and benchmarks).
        Returns tokens (B, R) long, response_mask (B, R) float32 (1 up to and including each row's first
        EOS; tokens after it are EOS fillers), and with return_logits the logits (B, R, V) float32 each
        token was sampled from (before temperature). R <= max_new_tokens: generation stops once every
        row has emitted EOS. Raises ValueError if P + max_new_tokens > block_size."""
        B, P = idx.shape
        L = P + max_new_tokens
        eos_token_id = self.eot_id if eos_token_id == "eot" else eos_token_id
        if max_new_tokens <= 0:  # nothing to generate: empty (B, 0) tokens and mask
            empty = idx.new_zeros(B, 0), torch.zeros(B, 0, device=idx.device)
            no_logits = torch.zeros(B, 0, self.config.padded_vocab_size, device=idx.device)
            return empty + (no_logits,) if return_logits else empty
        self.check_generation_fits(P, max_new_tokens)
        mask = torch.ones(B, L, dtype=torch.long, device=idx.device)  # generated tokens are all real
        if attention_mask is not None:
            mask[:, :P] = attention_mask
        seq = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], 1)  # (B, L)
        response_mask = torch.zeros(B, max_new_tokens, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = KVCache(self.config.n_layer, L) if use_cache else None
        all_logits = []
        for t in range(max_new_tokens):
            n = P + t  # tokens so far
            if cache is None:
                h = self.hidden_states(seq[:, :n], mask[:, :n])[:, -1]  # (B, C)
            elif t == 0:  # prefill the cache with the prompt
                h = self.hidden_states(seq[:, :n], mask[:, :n], cache, 0)[:, -1]
            else:  # one new token against the cached keys / values
                h = self.hidden_states(seq[:, n - 1:n], mask[:, :n], cache, n - 1)[:, -1]
            logits = self.lm_logits(h)  # (B, V)
            if return_logits:
                all_logits.append(logits)
            tok = sample_from_logits(logits, temperature, generator)  # (B,)
            if eos_token_id is not None:
                tok = torch.where(done, eos_token_id, tok)
            seq[:, n] = tok
            response_mask[:, t] = (~done).float()
            if eos_token_id is not None:
                done |= tok == eos_token_id
                if bool(done.all()):
                    break
        R = t + 1
        out = (seq[:, P:P + R], response_mask[:, :R])
        return out + (torch.stack(all_logits, 1),) if return_logits else out

# ----------------------------------------------------------------------------------------------------
# answers laid out for scoring

@torch.no_grad()
def sample_answers(model, prompt_idx, prompt_mask, max_new_tokens, temperature=1.0, generator=None, generate=None):
    """Answer LEFT-padded prompts with model.generate (or `generate`, called like it: speed.generate_fn's choice) and
    lay prompt + answer out as the scorers read them. prompt_idx (B, P) long, prompt_mask (B, P) 0/1. Returns a dict:
      idx (B, P+R) long, attention_mask (B, P+R), target_mask (B, P+R) 1 on the answer's tokens (through its EOS),
      response (B, R) long, response_mask (B, R), has_eos (B,) float 1 where the answer ended with the model's EOS.
    The answer's token t sits at position P + t."""
    generate = generate or model.generate
    response, response_mask = generate(prompt_idx, prompt_mask, max_new_tokens, temperature=temperature,
                                       generator=generator)  # (B, R) x2
    lengths = response_mask.sum(1).long()  # (B,)
    last = response.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]  # (B,) each answer's last token
    return dict(idx=torch.cat([prompt_idx, response], 1), attention_mask=torch.cat([prompt_mask, response_mask], 1),
                target_mask=torch.cat([torch.zeros_like(prompt_mask), response_mask], 1), response=response,
                response_mask=response_mask, has_eos=(last == model.eot_id).float() * (lengths > 0))


# ----------------------------------------------------------------------------------------------------
# sampling

def sample_from_logits(logits, temperature=1.0, generator=None, uniform=None):
    """One token per row from softmax(logits / temperature) (RLHF samples the policy as it is: no top-k, no top-p).
    logits (B, V) float; temperature 0 means argmax; generator must live on logits' device.
    Exact inverse-CDF sampling: i = first index with cdf_i > u, u ~ U[0, cdf_V), one uniform per row, drawn here
    from `generator`, or given: uniform (B, 1) float64 in [0, 1) (speed.decode_step draws it outside its graph).
    Returns (B,) long."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V) float64
    total = cdf[:, -1:]  # (B, 1) ~1
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = uniform * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never past the end
    i = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)  # (B,)
    return i
