"""
Step 1 of InstructGPT (Ouyang et al. 2022, section 3.5): supervised fine-tuning (SFT) of a language model on
demonstrations: on the imdb task (the default) the continuations of review prefixes, on hh the `chosen` responses of
HH-RLHF. The loss (sft_loss) is the next-token loss on the response tokens only, so the model learns to answer, not
to write questions.

InstructGPT starts from a pretrained GPT-3. Without a pretrained GPT at hand (offline, or on a laptop), this script
makes its own, so there are two starts:
  --init_from=scratch (the CPU preset): a small GPT first PRETRAINS for `pretrain_iters` steps on the task's text
      (imdb: the train and unsup reviews; hh: the chosen dialogues of `train`; every token a target), then
      fine-tunes on prompt -> response for `sft_iters` steps;
  --init_from=gpt2 (or gpt2-medium ..., or a local model.safetensors / folder): GPT-2's weights, no pretraining.
Each phase has its own warmup + cosine schedule; AdamW (beta2 = 0.95), gradient clipping and accumulation as in
nanoGPT; logits only at the target positions. sft.pt is written every checkpoint_every steps and at the end, and
`--resume=True` continues a killed run up to n_pretrain + sft_iters steps.

    python sft.py                                  # CPU preset, imdb
    python sft.py --task=hh --sft_iters=400        # any config key, --key=value
    python sft.py --init_from=gpt2 --vocab_size=50257 --lr=3e-5   # GPT-2 weights (downloaded once when online)
    torchrun --nproc_per_node=2 sft.py             # DDP (gloo on CPU, nccl on CUDA)

Writes out/<task>/sft.pt, sft_log.jsonl and sft.png and prints a report: test response loss, perplexity and bits per
byte before and after, answers to fixed test prompts, tokens/s and MFU where the GPU's peak is known, and on imdb the
gold judge's view of the SFT policy (the start of every RL run). The README and docs/cpu_preset.md give the figures
to expect.
"""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import evaluate
import gpt2
from checkpoint import checkpoint_due, model_from_checkpoint, resume_checkpoint, save_training_state, start_training
from common import setting
from model import GPT, GPTConfig, padded_vocab_size
from speed import torch_compile

# ----------------------------------------------------------------------------- config
config = dict(common.SHARED, # out_dir, data_dir, device, block_size, max_new_tokens, checkpoint_every, ... (common.py)
    init_from="scratch",     # "scratch" | "gpt2" | "gpt2-medium" ... | a local GPT-2 file/folder
    # model shape (from scratch only)
    n_layer=setting(4, ">= 1"),       # transformer blocks
    n_head=setting(4, ">= 1"),        # attention heads per block
    n_embd=setting(192, ">= 1"),      # embedding width (a multiple of n_head)
    dropout=setting(0.0, "[0, 1)"),   # dropout probability while training (with --init_from=gpt2 too)
    # phase 1, pretraining (from scratch only): every token of the task's text is a target
    pretrain_iters=setting(450, ">= 0"),      # optimiser steps (0 skips the phase)
    pretrain_batch_size=setting(16, ">= 1"),  # windows of block_size tokens per micro-batch
    pretrain_lr=setting(3e-3, ">= 0"),        # peak learning rate of the phase
    # phase 2, SFT: prompt -> chosen response, the prompt masked out
    sft_iters=setting(100, ">= 0"),  # optimiser steps
    batch_size=setting(32, ">= 1"),  # (prompt, chosen) examples per micro-batch
    lr=setting(1e-3, ">= 0"),        # peak learning rate of the phase (from GPT-2 weights use ~3e-5)
    grad_accum=setting(1, ">= 1"),   # micro-batches per optimiser step (per DDP rank)
    weight_decay=setting(0.1, ">= 0"),  # AdamW decoupled weight decay on matrices
    grad_clip=setting(1.0, ">= 0"),     # max gradient norm (0 = off)
    warmup_frac=setting(0.1, "[0, 1]"),  # linear warmup over this fraction of each phase, then cosine to 10%
    eval_every=setting(0, ">= 0"),     # evaluate on `test` every this many steps (also at the start, the end of
                                       # pretraining and the end; 0 = only those)
    eval_examples=setting(128, ">= 0"),  # test examples per evaluation, a fixed random subset (0 = all)
    n_answers=setting(2, ">= 0"),        # fixed test prompts answered at each evaluation (greedy and sampled)
    temperature=setting(0.8, ">= 0"),    # temperature of the sampled answer (0 = greedy)
)
cuda_config = dict(common.SHARED_CUDA,  # GPT-2-small shape from scratch
    n_layer=12, n_head=12, n_embd=768, dropout=0.1,
    pretrain_iters=4000, pretrain_batch_size=32, pretrain_lr=6e-4,  # ~65M tokens
    sft_iters=2000, batch_size=32, lr=1e-4,
    eval_every=500, eval_examples=0, n_answers=3,
)

# bf16 dense peak FLOP/s for MFU, matched against torch.cuda.get_device_name() (first match wins)
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


# ----------------------------------------------------------------------------- the math
def sft_loss(logits, targets, mask):
    """Masked next-token loss (InstructGPT section 3.5, SFT):
        L = - sum_t mask_t log softmax(logits_t)[targets_t] / sum_t mask_t
    Args:
        logits: (..., V) float, ALREADY ALIGNED with the targets: logits[..., i, :] is the distribution
            that predicts targets[..., i] (for a (B, T) batch pass logits[:, :-1], idx[:, 1:] and
            target_mask[:, 1:]). Any leading shape works, so a training loop may pass only the rows it
            needs, e.g. (N, V) logits of the N target positions with mask = ones(N): computing the full
            (B, T, V) logits is the main CPU cost.
        targets: (...) long token ids; read only where mask is 1 (pads may be any id).
        mask: (...) 0/1 (any dtype): 1 on the tokens that count (response tokens), 0 on prompt / padding.
    Returns: scalar float32 tensor, nats per target token (0 if the mask is all zero).
    Positions with mask 0 get exactly zero gradient.
    """
    mask = mask.float()
    targets = torch.where(mask.bool(), targets, 0)  # a pad id may lie outside the vocabulary
    nll = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")  # -log pi, (N,)
    return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)


def target_loss(model, batch, trunk=None, causal=False):
    """sft_loss of a collated batch (idx, attention_mask, target_mask (B, T)), logits only at the targets.
    trunk: model.hidden_states or a compiled version of it. causal=True: the batch has no padding (pretraining
    windows), so no attention mask is passed and attention takes the causal fast path (flash attention on CUDA; the
    same numbers on the CPU). Returns (loss, number of targets)."""
    trunk = trunk or model.hidden_states
    idx, mask = batch["idx"], batch["target_mask"][:, 1:]            # mask[:, t-1]: token t is a target
    h = trunk(idx, None if causal else batch["attention_mask"])[:, :-1]  # (B, T-1, C): h[:, t-1] predicts token t
    sel = mask.bool()                                               # (B, T-1)
    logits = model.lm_logits(h[sel])                                # (N, V) only the N target positions
    return sft_loss(logits, idx[:, 1:][sel], mask[sel]), mask.sum()


def accumulate_sft_gradients(model, micro_batches, rt, trunk=None, causal=False):
    """Forward + backward of one optimiser step over its micro-batches (already on rt.device).
    Each micro-batch's loss (a mean over its n_i target tokens) is scaled by n_i / N, N = the step's target
    tokens over all micro-batches and all DDP ranks (times world_size, because all_reduce_grads then
    averages the ranks). The gradient is thus that of ONE token-level mean over the whole step: 1
    micro-batch of 8 examples and 8 micro-batches of 1 give the same gradient. Per token, not per example (as
    reward.py's per prompt): sft_loss is a mean over target tokens, so a long answer weighs more than a short one.
    causal: the micro-batches have no padding (target_loss). Returns the step's loss on this rank (float, nats per
    target token), read from the device once, after every backward is queued."""
    counts = [b["target_mask"][:, 1:].sum() for b in micro_batches]
    total = common.all_reduce_mean(sum(counts), rt) * rt.world_size  # N, target tokens of the whole step
    step_loss = 0.0
    for b, n in zip(micro_batches, counts):
        with rt.autocast():
            loss, _ = target_loss(model, b, trunk, causal)
        (loss * n / total * rt.world_size).backward()
        step_loss = step_loss + loss.detach().double() * n.double()  # on the device: no sync per micro-batch
    return (step_loss / sum(counts).clamp(min=1)).item()  # this rank's token-level mean, for display


def flops_per_step(model, n_tokens, n_targets, T):
    """Training FLOPs (forward + backward) of a step, PaLM appendix B / nanoGPT estimate_mfu: 6 FLOPs per
    weight per token plus 12 L T C per token for attention. The tied output layer (C x V weights) only
    runs on the n_targets positions whose logits are computed; the other weights on every token."""
    c = model.config
    n_out = c.n_embd * c.padded_vocab_size                           # lm_head = wte, tied
    n_body = model.num_params() - n_out - c.block_size * c.n_embd    # position table: a lookup, no FLOPs
    n_body -= model.scalar_head.weight.numel() if model.scalar_head is not None else 0
    return 6 * n_body * n_tokens + 12 * c.n_layer * T * c.n_embd * n_tokens + 6 * n_out * n_targets


def peak_flops(rt):
    """(peak FLOP/s, device name) for bf16 on a known GPU, (None, name) otherwise."""
    if rt.device_type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name()
    return next((p for key, p in PEAK_FLOPS if key in name), None), name


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def response_loss(model, examples, rt, batch_size):
    """Response loss on examples (prompt -> chosen): nats per response token over all of them (a
    token-level mean), the perplexity exp(loss), and bits per byte of the response text,
        bpb = sum_t -log2 pi(y_t) / (UTF-8 bytes of the responses)
    which, unlike nats per token, compares models of different vocabularies (an EOT counts in the sum, not in
    the bytes)."""
    nll, count = 0.0, 0.0
    with common.eval_mode(model):
        for i in range(0, len(examples), batch_size):
            with rt.autocast():
                loss, n = target_loss(model, common.to_device(data.collate_sft(examples[i:i + batch_size]), rt))
            nll, count = nll + loss.item() * n.item(), count + n.item()
    n_bytes = sum(len(data.decode(e["chosen"], model.config.n_tokens).encode("utf-8")) for e in examples)
    loss = nll / max(count, 1)
    return loss, math.exp(min(loss, 50)), nll / math.log(2) / max(n_bytes, 1)


def answers(model, prompts, rt, max_new_tokens, temperature, seed=0):
    """Greedy and sampled answers to the prompts (examples): list of dict(prompt, greedy, sampled) text."""
    out = [dict(prompt=data.decode(p["prompt"], model.config.n_tokens)) for p in prompts]
    for name, temp in (("greedy", 0.0), ("sampled", temperature)):
        for o, text in zip(out, evaluate.answers_text(model, prompts, rt, max_new_tokens, temp, seed)):
            o[name] = text
    return out


def print_answers(items):
    for a in items:
        print(f"  PROMPT ...{a['prompt'][-150:]!r}\n    greedy:  {a['greedy']!r}\n    sampled: {a['sampled']!r}")


# ----------------------------------------------------------------------------- training
def pretrain_steps(cfg, ckpt=None):
    """The length of the pretraining phase: the resumed run's (its checkpoint's), else pretrain_iters from scratch
    and none from GPT-2 weights. The one source of it, so a resume never mixes two."""
    if ckpt is not None:
        return ckpt["n_pretrain"]
    return cfg.pretrain_iters if cfg.init_from == "scratch" else 0


def build_model(cfg, ckpt=None):
    """The GPT to train and the length of its pretraining phase: the checkpoint's model when resuming, a fresh
    GPT from scratch (pretraining first), or GPT-2 weights (no pretraining phase)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every DDP rank
    if ckpt is not None:
        return model_from_checkpoint(ckpt), pretrain_steps(cfg, ckpt)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout, n_tokens=cfg.vocab_size,
                              padded_vocab_size=padded_vocab_size(cfg.vocab_size)))
        return model, pretrain_steps(cfg)
    if cfg.vocab_size != data.GPT2_VOCAB:
        raise common.UserError(f"--init_from={cfg.init_from} needs GPT-2's whole vocabulary: pass "
                               f"--vocab_size={data.GPT2_VOCAB} (got {cfg.vocab_size})")
    return gpt2.from_pretrained(cfg.init_from, block_size=cfg.block_size, dropout=cfg.dropout), 0


def phase_at(step, n_pretrain, cfg):
    """The phase of optimiser step `step` and its learning rate: each phase its own warmup, then cosine to 10%."""
    phase = "pretrain" if step < n_pretrain else "sft"
    start, length = (0, n_pretrain) if phase == "pretrain" else (n_pretrain, cfg.sft_iters)
    peak_lr = cfg.pretrain_lr if phase == "pretrain" else cfg.lr
    return phase, common.lr_at(step - start, length, peak_lr, max(1, int(cfg.warmup_frac * length)))


def micro_batches(phase, stream, train, cfg, gen, rt):
    """The grad_accum micro-batches of a step, on rt.device: random windows of the text stream, every token a target
    (pretrain), or random (prompt, chosen) examples, the prompt masked out (sft)."""
    if phase == "pretrain":
        micro = [data.sample_text_batch(stream, cfg.pretrain_batch_size, cfg.block_size, gen)
                 for _ in range(cfg.grad_accum)]
    else:
        micro = [data.collate_sft([train[i] for i in torch.randint(len(train), (cfg.batch_size,), generator=gen)])
                 for _ in range(cfg.grad_accum)]
    return [common.to_device(b, rt) for b in micro]


def evaluate_and_log(model, test_eval, answer_prompts, logger, cfg, rt, step):
    """Test response loss, perplexity, bits per byte and answers at `step`, printed and logged. Returns
    (loss, ppl, answers, bpb)."""
    loss, ppl, bpb = response_loss(model, test_eval, rt, cfg.eval_batch_size)
    ans = answers(model, answer_prompts, rt, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    print(f"\nstep {step}: test response loss {loss:.4f}, perplexity {ppl:.1f}, {bpb:.3f} bits per byte")
    print_answers(ans)
    logger.log(step, test_loss=loss, test_ppl=ppl, test_bpb=bpb,
               **{f"answer{i}_{k}": a[k] for i, a in enumerate(ans) for k in ("greedy", "sampled")})
    return loss, ppl, ans, bpb


def main(argv=None):
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    rt = common.setup_runtime(cfg)
    t_start = time.time()
    path = os.path.join(cfg.out_dir, "sft.pt")
    ckpt, done = resume_checkpoint(cfg, path, "sft", lambda ckpt: pretrain_steps(cfg, ckpt) + cfg.sft_iters)
    if done:
        return common.cleanup(rt) or {}
    task = data.load_task(cfg, verbose=rt.master)
    train, test = task.sft_train, task.sft_test
    test_eval = common.subset(test, cfg.eval_examples)  # a fixed random subset
    answer_prompts = sorted(test, key=lambda e: len(e["prompt"]))[:cfg.n_answers]  # the shortest: fixed
    model, n_pretrain = build_model(cfg, ckpt)
    if model.config.block_size < cfg.block_size:
        raise common.UserError(f"--block_size={cfg.block_size} exceeds the model's block_size "
                               f"{model.config.block_size}")
    model.to(rt.device).train()
    # compiled: one graph per phase, the pretraining windows (no mask: the causal path) and the padded SFT batches
    trunks = {phase: torch_compile(model.hidden_states, dynamic=True, isolate_recompiles=True) if cfg.compile
              else model.hidden_states for phase in ("pretrain", "sft")}
    gen = torch.Generator().manual_seed(cfg.seed + rt.rank)  # each rank samples its own batches
    optimizer, state, step, logger = start_training(model, cfg, rt, ckpt, "sft", dict(gen=gen))
    total_steps = n_pretrain + cfg.sft_iters
    stream = task.text if step < n_pretrain else None  # phase 1 text
    if rt.master:
        print(f"GPT {model.num_params() / 1e6:.2f}M parameters ({cfg.init_from}); {n_pretrain} pretraining + "
              f"{cfg.sft_iters} SFT steps; {len(train)} train / {len(test)} test examples")
    run_eval = lambda step: evaluate_and_log(model, test_eval, answer_prompts, logger, cfg, rt, step)
    before = None  # the model before its first training step: measured in a fresh run, kept in the checkpoint for
    if rt.master:  # a resumed one (which starts from trained weights)
        before = (ckpt or {}).get("before") or run_eval(step)
    speed, losses, first_step = dict(tokens=0, flops=0.0, seconds=0.0), {"pretrain": [], "sft": []}, step
    bar = tqdm(range(step, total_steps), disable=not rt.master, desc="sft", dynamic_ncols=True)
    for step in bar:
        phase, lr = phase_at(step, n_pretrain, cfg)
        common.set_lr(optimizer, lr)
        t0 = time.time()
        micro = micro_batches(phase, stream, train, cfg, gen, rt)
        loss = accumulate_sft_gradients(model, micro, rt, trunks[phase], causal=phase == "pretrain")
        common.check_finite(step, loss=loss)
        grad_norm = common.optimizer_step(model, optimizer, cfg.grad_clip, rt, step)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        n_tok = sum(b["attention_mask"].sum().item() for b in micro) * rt.world_size  # real tokens, all ranks
        if step not in (first_step, n_pretrain):  # a phase's first step (warm-up, compilation) is not timed
            speed["tokens"], speed["seconds"] = speed["tokens"] + n_tok, speed["seconds"] + dt
            speed["flops"] += rt.world_size * sum(flops_per_step(model, b["attention_mask"].sum().item(),
                                                                 b["target_mask"][:, 1:].sum().item(),
                                                                 b["idx"].shape[1])
                                                  for b in micro)
        losses[phase].append(loss)
        bar.set_postfix(phase=phase, loss=f"{loss:.3f}", tok_s=f"{n_tok / dt:.0f}")
        logger.log(step, **{f"{phase}_loss": loss}, lr=lr, grad_norm=grad_norm, tokens_per_s=n_tok / dt)
        periodic = cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0
        if rt.master and (periodic or step + 1 == n_pretrain) and step + 1 < total_steps:  # + the phase boundary
            run_eval(step + 1)
        if checkpoint_due(step + 1, cfg, total_steps):
            save_training_state(path, "sft", cfg, step + 1, total_steps, rt, **state, n_pretrain=n_pretrain,
                                before=before)
    bar.close()

    report = {}
    if rt.master:
        after = run_eval(total_steps)
        logger.plot()
        report = make_report(model, task, cfg, rt, before, after, losses, speed, len(test_eval),
                             f"{n_pretrain} pretraining + {cfg.sft_iters} SFT steps, {time.time() - t_start:.0f} s")
    common.cleanup(rt)
    return report


def make_report(model, task, cfg, rt, before, after, losses, speed, n_test, run):
    """Print and return the report: the train losses' ends, the test figures before -> after (evaluate_and_log's),
    the speed, the answers, and on imdb the gold judge's view of the SFT policy (the start of every RL run)."""
    peak, device_name = peak_flops(rt)
    tok_s = speed["tokens"] / max(speed["seconds"], 1e-9)
    achieved = speed["flops"] / max(speed["seconds"], 1e-9)
    mfu = achieved / peak if peak else None
    report = dict(test_loss_before=before[0], test_ppl_before=before[1], test_loss_after=after[0],
                  test_ppl_after=after[1], test_bpb_before=before[3], test_bpb_after=after[3], answers=after[2],
                  tokens_per_s=tok_s, flops_per_s=achieved,
                  mfu=mfu, **{f"{p}_loss_{w}": sum(x) / len(x) for p, v in losses.items() if v
                              for w, x in (("first", v[:5]), ("last", v[-5:]))})
    print(f"\n=== SFT report ({cfg.init_from}, {run}) ===")
    for p, v in losses.items():
        if v:
            print(f"  {p} train loss: {report[f'{p}_loss_first']:.3f} -> {report[f'{p}_loss_last']:.3f} "
                  "(mean of the first 5 steps -> of the last 5)")
    print(f"  test response loss {before[0]:.4f} -> {after[0]:.4f} nats/token "
          f"(perplexity {before[1]:.1f} -> {after[1]:.1f}; {before[3]:.3f} -> {after[3]:.3f} bits per byte) on "
          f"{n_test} test examples")
    speed = f"  {tok_s:.0f} tokens/s, {achieved / 1e9:.1f} GFLOP/s achieved on {device_name}"
    print(speed + (f", MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak
                   else " (peak unknown, no MFU)"))
    print("  answers to fixed test prompts:")
    print_answers(after[2])
    if task.judge is not None:  # the gold judge's view of the SFT policy: the start of every RL run
        prompts = evaluate.eval_prompts(task.prompts_test, cfg)
        report["eval"] = evaluate.summarize(evaluate.sample_and_score(
            model, None, None, prompts, rt, cfg.eval_batch_size, cfg.max_new_tokens, seed=cfg.eval_seed,
            judge=task.judge))
        print(f"  answers to the first {len(prompts)} test prompts (seed {cfg.eval_seed}, temperature 1):")
        evaluate.print_summary("sft", report["eval"])
    print(f"  wrote {cfg.out_dir}/sft.pt, sft_log.jsonl, sft.png")
    return report


if __name__ == "__main__":
    common.cli(main)
