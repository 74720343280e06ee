"""
The project's speed benchmark (random-init GPT, so no checkpoint is needed): a training step (tokens/s),
generation (new tokens/s, with and without the KV cache), the forward pass with full vs last-token
logits, and the sampler (torch.multinomial vs model.sample_from_logits).
    python bench.py                          # the CPU preset (sft.py's 4 x 192 GPT, 8,192 tokens, PPO's batch)
    python bench.py --vocab_size=50257       # the same with GPT-2's whole vocabulary: what the cut buys
    python bench.py --device=cuda --batch_size=128
"""
import time

import torch
import torch.nn.functional as F

from common import parse_config, setup_runtime
from model import GPT, GPTConfig, padded_vocab_size, sample_from_logits

config = dict(device="auto", dtype="auto", seed=1337, compile=False, n_layer=4, n_head=4, n_embd=192,
              vocab_size=8192, block_size=256, batch_size=64, prompt_len=8, max_new_tokens=48, train_batch_size=16,
              repeats=3)


def timed(fn, cfg, repeats):
    """Best wall time (seconds) of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def train_step_tokens_per_s(model, cfg, rt):
    """Tokens/s of a pretraining step (forward + backward of train_batch_size x block_size tokens, every token a
    target, as sft.py's first phase), best of `repeats`."""
    idx = torch.randint(0, cfg.vocab_size - 1, (cfg.train_batch_size, cfg.block_size), device=rt.device)

    def step():
        with rt.autocast():
            logits = model(idx[:, :-1])  # (B, T-1, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
    return idx.numel() / timed(step, cfg, cfg.repeats)


def main(argv=None):
    cfg = parse_config(config, argv)
    rt = setup_runtime(cfg)
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          n_tokens=cfg.vocab_size, vocab_size=padded_vocab_size(cfg.vocab_size))).to(rt.device)
    tok_s = train_step_tokens_per_s(model, cfg, rt)
    model.eval()
    with torch.no_grad():
        report = measure(model, cfg, rt)
    report["train_tok_s"] = tok_s
    print(f"train step B{cfg.train_batch_size} x T{cfg.block_size} (forward + backward): {tok_s:8.0f} tokens/s")
    return report


def measure(model, cfg, rt):
    """Generation, forward and sampler figures of an eval-mode model (printed), as a dict."""
    fwd = torch.compile(model) if cfg.compile else model
    print(f"GPT {model.num_params() / 1e6:.2f}M parameters on {rt.device} ({cfg.dtype}, "
          f"{torch.get_num_threads()} threads)")
    B, P, N = cfg.batch_size, cfg.prompt_len, cfg.max_new_tokens
    prompt = torch.randint(0, cfg.vocab_size - 1, (B, P), device=rt.device)
    mask = torch.ones(B, P, device=rt.device)
    mask[: B // 2, : P // 4] = 0  # half the rows left-padded
    report = {}
    for use_cache in (True, False):
        def gen():
            with rt.autocast():  # eos_token_id=None: all B x N tokens are generated
                model.generate(prompt, mask, N, temperature=1.0, eos_token_id=None, use_cache=use_cache)
        s = timed(gen, cfg, 1 if not use_cache else cfg.repeats)
        report[f"generate_{'cache' if use_cache else 'nocache'}_tok_s"] = B * N / s
        print(f"generate B{B} P{P} +{N} tokens, {'KV cache   ' if use_cache else 'no cache   '}: "
              f"{B * N / s:8.0f} new tokens/s ({s:.2f} s)")
    idx = torch.randint(0, cfg.vocab_size - 1, (B, cfg.block_size), device=rt.device)
    for name, fn in (("full logits      ", lambda: fwd(idx)),
                     ("last-token logits", lambda: model.lm_logits(model.hidden_states(idx)[:, -1]))):
        with rt.autocast():
            s = timed(fn, cfg, cfg.repeats)
        report[f"forward_{name.split()[0]}_s"] = s
        print(f"forward B{B} x T{cfg.block_size}, {name}: {s * 1e3:8.1f} ms")
    logits = torch.randn(B, model.config.vocab_size, device=rt.device)
    for name, fn in (("torch.multinomial ", lambda: torch.multinomial(F.softmax(logits, -1), 1)),
                     ("sample_from_logits", lambda: sample_from_logits(logits))):
        s = timed(fn, cfg, 20)
        report[f"sample_{name.strip()}_ms"] = s * 1e3
        print(f"sample B{B} x V{logits.shape[1]}, {name}: {s * 1e3:8.2f} ms")
    return report


if __name__ == "__main__":
    import common
    common.cli(main)
