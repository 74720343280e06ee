"""
The project's speed benchmark (random-init GPT, so no checkpoint is needed): a training step (tokens/s),
generation (new tokens/s: model.generate with and without the KV cache, speed.StaticGenerator), the forward pass
with full vs last-token logits, and the sampler (torch.multinomial vs model.sample_from_logits).
    python bench.py                          # the CPU preset (sft.py's 4 x 192 GPT, 8,192 tokens, PPO's batch)
    python bench.py --vocab_size=50257       # the same with GPT-2's whole vocabulary: what the cut buys
    python bench.py --device=cuda --batch_size=128
    python bench.py --compile_check          # the CUDA preset's torch.compile path on the CPU: graph breaks, recompiles
    python bench.py --compile_check --n_layer=12   # ... at GPT-2-small's depth (dynamo's recompile_limit is per frame)
    python bench.py --gpu                    # the CUDA preset's figures in one table (GPT-2-small shape, <= 8 min)
    python bench.py --gpu --device=cpu       # the same at a tiny shape: a dry run (in the test suite)
    python bench.py --gpu --help             # the settings of --gpu (--help alone: those of the plain run)
"""
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common
from common import parse_config, setup_runtime
from model import GPT, GPTConfig, padded_vocab_size, sample_from_logits
from speed import StaticGenerator

config = dict(
    device="auto",           # auto | cpu | cuda | cuda:N
    dtype="auto",            # auto (bfloat16 on a CUDA GPU that has it, float32 elsewhere) | float32 | bfloat16
    seed=1337,               # the random seed of the initial weights and the inputs
    compile=False,           # torch.compile the model for the full-logits forward
    n_layer=4,               # transformer blocks
    n_head=4,                # attention heads per block
    n_embd=192,              # embedding width (a multiple of n_head)
    vocab_size=8192,         # tokens of the vocabulary (50257 = GPT-2's whole one)
    block_size=256,          # the model's context, and the tokens per row of the forward and the training step
    batch_size=64,           # rows per generation and forward (PPO's rollout batch)
    prompt_len=8,            # tokens per generation prompt (half the rows left-padded)
    max_new_tokens=48,       # tokens generated per row
    train_batch_size=16,     # windows of block_size tokens per training step
    repeats=3,               # timed calls per figure after a warm-up one (the best is reported)
)


def once(fn, cfg):
    """Wall time (seconds) of one call of fn, the GPU's queued work included."""
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(fn, cfg, repeats):
    """Best wall time (seconds) of `repeats` calls after one warm-up call."""
    fn()
    return min(once(fn, cfg) for _ in range(repeats))


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if ("--compile_check" in argv or "--compile_check=True" in argv) and not set(argv) & set(common.HELP_FLAGS):
        return compile_check([a for a in argv if not a.startswith("--compile_check")])
    if "--gpu" in argv or "--gpu=True" in argv:
        return gpu_bench([a for a in argv if not a.startswith("--gpu")])
    cfg = parse_config(config, argv)
    rt = setup_runtime(cfg)
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          n_tokens=cfg.vocab_size, padded_vocab_size=padded_vocab_size(cfg.vocab_size))).to(rt.device)
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
    generators = dict(cache=("KV cache    ", model.generate), static=("static cache", StaticGenerator(model)),
                      nocache=("no cache    ", lambda *a, **k: model.generate(*a, use_cache=False, **k)))
    for key, (label, generate) in generators.items():
        def gen():
            with rt.autocast():  # eos_token_id=None: all B x N tokens are generated
                generate(prompt, mask, N, temperature=1.0, eos_token_id=None)
        s = timed(gen, cfg, 1 if key == "nocache" else cfg.repeats)
        report[f"generate_{key}_tok_s"] = B * N / s
        print(f"generate B{B} P{P} +{N} tokens, {label}: {B * N / s:8.0f} new tokens/s ({s:.2f} s)")
    idx = torch.randint(0, cfg.vocab_size - 1, (B, cfg.block_size), device=rt.device)
    for name, fn in (("full logits      ", lambda: fwd(idx)),
                     ("last-token logits", lambda: model.lm_logits(model.hidden_states(idx)[:, -1]))):
        with rt.autocast():
            s = timed(fn, cfg, cfg.repeats)
        report[f"forward_{name.split()[0]}_s"] = s
        print(f"forward B{B} x T{cfg.block_size}, {name}: {s * 1e3:8.1f} ms")
    logits = torch.randn(B, model.config.padded_vocab_size, device=rt.device)
    for name, fn in (("torch.multinomial ", lambda: torch.multinomial(F.softmax(logits, -1), 1)),
                     ("sample_from_logits", lambda: sample_from_logits(logits))):
        s = timed(fn, cfg, 20)
        report[f"sample_{name.strip()}_ms"] = s * 1e3
        print(f"sample B{B} x V{logits.shape[1]}, {name}: {s * 1e3:8.2f} ms")
    return report


# ----------------------------------------------------------------------------------------------------
# --compile_check: the CUDA preset's torch.compile path, run on the CPU

CHECK_SHARED = dict(task="hh", device="cpu", compile=True, dtype="bfloat16", vocab_size=50257, block_size=128,
                    max_prompt_len=64, max_new_tokens=32, eval_prompts=4, eval_batch_size=4, checkpoint_every=0)
CHECK_STAGES = dict(  # each stage's cuda_config with its steps, batches and evaluation sets cut to a few
    sft=dict(n_layer=2, n_head=2, n_embd=64, pretrain_iters=3, pretrain_batch_size=2, sft_iters=3, batch_size=2,
             eval_every=0, eval_examples=4, n_answers=1),
    reward=dict(n_prompts=8, n_test_prompts=4, max_iters=3, batch_size=2, eval_every=0, eval_rankings=4,
                norm_examples=4, n_show=1),
    ppo=dict(iterations=3, batch_size=4, minibatch_size=2, ppo_epochs=1, sample_every=0, n_sample_prompts=1,
             ptx_batch_size=2, ptx_block_size=64),
    dpo=dict(train_pairs=8, batch_size=2, grad_accum=1, max_iters=3, log_every=1, eval_pairs=4, eval_every=2),
)


class _LimitHits(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings (the frame then runs eager)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record):
        self.n += "recompile_limit" in record.getMessage()


def run_compiled_stage(stage, argv, log_path):
    """Run `stage`.main(argv) from a fresh dynamo state, its output into log_path; return what dynamo compiled:
    graphs, graph breaks, recompiles (with their reasons) and recompile-limit hits."""
    import torch._dynamo
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    hits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    t0 = time.time()
    try:
        with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            importlib.import_module(stage).main(argv)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(hits)
    recompiles = [f"{m.co_name}: {m.recompile_reason}" for m in get_compilation_metrics() if m.recompile_reason]
    return dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                break_reasons=list(counters["graph_break"]), recompiles=len(recompiles), recompile_reasons=recompiles,
                limit_hits=hits.n, seconds=time.time() - t0)


def compile_check(overrides=()):
    """Every stage (sft, reward, ppo, dpo, each on the previous one's checkpoints) with its CUDA preset (cuda_config)
    on the CPU at a reduced shape (CHECK_SHARED, CHECK_STAGES; `overrides`, --key=value, go to every stage that has
    the key), compile on, for a few steps. Prints per stage the graphs dynamo compiled, its graph breaks and
    recompiles; the targets: no graph break, no recompile (so none after the first step), no recompile-limit hit.
    Returns {stage: counts} plus "ok"."""
    given = dict(a[2:].split("=", 1) for a in overrides)
    out_dir = given.pop("out_dir", None) or tempfile.mkdtemp(prefix="compile_check_")
    os.makedirs(out_dir, exist_ok=True)
    print(f"compile check: the CUDA preset on the CPU, reduced; stage logs and checkpoints in {out_dir}")
    print(f"{'stage':8s} {'graphs':>6s} {'graph breaks':>12s} {'recompiles':>10s} {'limit hits':>10s} {'seconds':>8s}")
    report = {}
    for stage, cut in CHECK_STAGES.items():
        module = importlib.import_module(stage)
        args = {**module.cuda_config, **CHECK_SHARED, **cut, **given, "out_dir": out_dir}
        argv = [f"--{k}={v}" for k, v in args.items() if k in module.config]
        r = report[stage] = run_compiled_stage(stage, argv, os.path.join(out_dir, f"{stage}.log"))
        print(f"{stage:8s} {r['graphs']:6d} {r['graph_breaks']:12d} {r['recompiles']:10d} {r['limit_hits']:10d} "
              f"{r['seconds']:8.0f}")
        for reason in r["break_reasons"] + r["recompile_reasons"]:
            print(f"    {reason.splitlines()[0][:200]}")
    report["ok"] = all(r["graph_breaks"] == r["recompiles"] == r["limit_hits"] == 0 for r in report.values())
    print("targets met: no graph break, no recompile, no recompile-limit hit" if report["ok"] else
          "targets NOT met (see above and the stage logs)")
    return report


# ----------------------------------------------------------------------------------------------------
# --gpu: the CUDA preset's figures in one table

GPU_DRY_RUN = dict(  # on the CPU: every path runs, nothing is timed; GPU_SIZES on a GPU
    device="auto",           # auto | cpu | cuda | cuda:N
    dtype="auto",            # auto (bfloat16 on a CUDA GPU that has it, float32 elsewhere) | float32 | bfloat16
    seed=1337,               # the random seed of the initial weights and the inputs
    n_layer=2,               # transformer blocks
    n_head=2,                # attention heads per block
    n_embd=64,               # embedding width (a multiple of n_head)
    vocab_size=512,          # tokens of the vocabulary
    block_size=64,           # the model's context
    batch_size=4,            # prompts per generation (PPO's rollout batch)
    prompt_len=8,            # tokens per prompt (half the rows left-padded)
    max_new_tokens=8,        # tokens generated per prompt
    train_batch_size=2,      # windows per pretraining step (sft.py's first phase)
    train_block_size=32,     # tokens per window
    rm_rows=8,               # rows of prompt + answer per reward-model step
    dpo_rows=8,              # rows of prompt + answer (chosen and rejected) per DPO micro-batch
    repeats=1,               # timed calls per figure after the first (the best is reported)
    backend="eager",         # torch.compile's backend: eager (dynamo only, a dry run) | inductor
)
GPU_SIZES = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=512, batch_size=128, prompt_len=64,
                 max_new_tokens=128, train_batch_size=32, train_block_size=512, rm_rows=64, dpo_rows=64, repeats=3,
                 backend="inductor")  # GPT-2 small; PPO's rollout batch; sft's windows; reward.py's 16 x K=4 rows and
                                      # dpo.py's 32 pairs (64 rows) of prompt + answer


def gpu_bench(argv=()):
    """The figures that decide the CUDA preset, on a random-init GPT of its shape (no checkpoint, no data): generation
    (no cache / KV cache / static cache, eager and compiled: new tokens/s and ms per decode step), a pretraining
    step (tokens/s, MFU, eager and compiled, compile seconds), one PPO iteration of the preset split into
    generation, scoring and update (model.generate and StaticGenerator), and reward-model and DPO steps/s.
    Prints one table and returns {figure: value}. On the CPU (--device=cpu) it runs at a tiny shape with dynamo's
    eager backend: a dry run of every path, its figures meaningless."""
    import ppo
    import sft
    import speed
    from model import sample_answers
    cfg = parse_config(GPU_DRY_RUN, argv, cuda_overrides=GPU_SIZES, verbose=False)
    rt = setup_runtime(cfg)
    shape = dict(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                 n_tokens=cfg.vocab_size, padded_vocab_size=padded_vocab_size(cfg.vocab_size))
    gpt = lambda head=False: GPT(GPTConfig(**shape, scalar_head=head)).to(rt.device)
    B, P, N = cfg.batch_size, cfg.prompt_len, cfg.max_new_tokens
    rows, report = [], {}

    def row(name, value, unit, note=""):
        report[name] = value
        rows.append((name, value, unit, note))

    print(f"bench --gpu: GPT {cfg.n_layer} x {cfg.n_embd}, {cfg.vocab_size} tokens on {rt.device} ({cfg.dtype}), "
          f"torch {torch.__version__}{' (dry run: figures meaningless)' if rt.device_type == 'cpu' else ''}")
    policy = gpt().eval()
    prompt = torch.randint(0, cfg.vocab_size - 1, (B, P), device=rt.device)
    mask = torch.ones(B, P, device=rt.device)
    mask[: B // 2, : P // 4] = 0  # half the rows left-padded

    # 1. generation: B prompts of P tokens, N new tokens each (no EOS: every token generated)
    generators = dict(nocache=lambda *a, **k: policy.generate(*a, use_cache=False, **k), cache=policy.generate,
                      static=speed.StaticGenerator(policy))
    compiled_static = speed.StaticGenerator(policy)
    compiled_static.step = speed.torch_compile(speed.decode_step, fullgraph=True, backend=cfg.backend)
    generators["static_compiled"] = compiled_static
    for name, generate in generators.items():
        run = lambda: generate(prompt, mask, N, 1.0, None, torch.Generator(rt.device).manual_seed(0))
        with torch.no_grad(), rt.autocast():
            first = once(run, cfg)
            s = min(once(run, cfg) for _ in range(1 if name == "nocache" else cfg.repeats))
        row(f"generate_{name}_tok_s", B * N / s, "new tokens/s", f"{s / N * 1e3:.2f} ms per token step")
        if name == "static_compiled":
            row("generate_compile_s", first - s, "s", "compiling the decode step (first call - a later one)")
    for name in ("cache", "static", "static_compiled"):  # the target: >= 10x
        report[f"generate_{name}_vs_nocache"] = report[f"generate_{name}_tok_s"] / report["generate_nocache_tok_s"]

    # 2. a pretraining step of sft.py: train_batch_size windows of train_block_size tokens, every token a target
    model = gpt().train()
    optimizer = common.configure_optimizer(model, 1e-4, 0.1)
    T = cfg.train_block_size
    idx = torch.randint(0, cfg.vocab_size - 1, (cfg.train_batch_size, T), device=rt.device)
    batch = dict(idx=idx, attention_mask=torch.ones_like(idx, dtype=torch.float),
                 target_mask=torch.ones_like(idx, dtype=torch.float))
    peak, _ = sft.peak_flops(rt)
    flops = sft.flops_per_step(model, idx.numel(), cfg.train_batch_size * (T - 1), T)
    for name, trunk in (("eager", model.hidden_states),
                        ("compiled", speed.torch_compile(model.hidden_states, dynamic=True, backend=cfg.backend))):
        def step():
            sft.accumulate_sft_gradients(model, [batch], rt, trunk, causal=True)
            common.optimizer_step(model, optimizer, 1.0, rt, 0)
        first = once(step, cfg)
        s = min(once(step, cfg) for _ in range(cfg.repeats))
        row(f"train_{name}_tok_s", idx.numel() / s, "tokens/s",
            f"MFU {flops / s / peak:.1%}" if peak else "MFU: peak unknown for this device")
        if peak:
            report[f"train_{name}_mfu"] = flops / s / peak
        if name == "compiled":
            row("train_compile_s", first - s, "s", "compiling the trunk (first step - a later one)")

    # 3. one PPO iteration of the preset's shape: rollout (generation, then scoring), rewards, GAE, the update
    pcfg = parse_config(ppo.config, [f"--device={rt.device}", f"--batch_size={B}", f"--max_new_tokens={N}",
                                     f"--minibatch_size={min(B, ppo.cuda_config['minibatch_size'])}"],
                        cuda_overrides=ppo.cuda_config, verbose=False)
    reference, critic, reward_model = gpt().eval(), gpt(True).eval(), gpt(True).eval()
    run = SimpleNamespace(policy=policy, critic=critic, logprobs=policy.logprobs, gen=torch.Generator().manual_seed(0),
                          opt_policy=common.configure_optimizer(policy, 1e-5, 0.0),
                          opt_critic=common.configure_optimizer(critic, 1e-5, 0.0))
    prompts = dict(idx=prompt, attention_mask=mask)
    for name in ("cache", "static"):
        rt.fast_generation = name == "static"
        sampler = torch.Generator(rt.device).manual_seed(0)
        generate = lambda: sample_answers(policy, prompt, mask, N, 1.0, sampler,
                                          generate=speed.generate_fn(policy, rt))
        with rt.autocast():
            t_gen = timed(generate, cfg, cfg.repeats)
        rollouts = []
        roll = lambda: rollouts.append(ppo.rollout(policy, reference, critic, reward_model, prompts, rt, N, 1.0,
                                                   sampler, policy.logprobs))
        t_rollout, batch = timed(roll, cfg, cfg.repeats), rollouts[-1]
        rewards = ppo.per_token_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, batch.response_mask,
                                        pcfg.beta)
        advantages, returns = ppo.compute_gae(rewards, batch.old_values, batch.response_mask, pcfg.gamma, pcfg.lam)
        advantages = ppo.whiten(advantages, batch.response_mask)
        t_update = timed(lambda: ppo.update(run, batch, advantages, returns, batch.old_values, pcfg.beta, pcfg, rt,
                                            None, 0), cfg, cfg.repeats)
        row(f"ppo_{name}_generation_s", t_gen, "s", f"{B} answers x {N} tokens")
        row(f"ppo_{name}_scoring_s", t_rollout - t_gen, "s", "log pi_old, log pi_ref, V, the reward model's score")
        row(f"ppo_{name}_update_s", t_update, "s", f"{pcfg.ppo_epochs} epochs x minibatches of {pcfg.minibatch_size}")
        row(f"ppo_{name}_iteration_s", t_rollout + t_update, "s", "rollout + update")
    rt.fast_generation = False

    # 4. reward-model and DPO steps: rows of prompt + answer, forward + backward + optimiser step
    L = P + N
    rows_idx = lambda n: torch.randint(0, cfg.vocab_size - 1, (n, L), device=rt.device)
    rm = gpt(True).train()
    rm_opt = common.configure_optimizer(rm, 1e-5, 0.0)
    x, ones = rows_idx(cfg.rm_rows), torch.ones(cfg.rm_rows, L, device=rt.device)

    def rm_step():
        with rt.autocast():
            loss = rm.score(x, ones).float().pow(2).mean()  # the shape of the ranking loss's work, not its value
        loss.backward()
        common.optimizer_step(rm, rm_opt, 1.0, rt, 0)
    row("reward_steps_s", 1 / timed(rm_step, cfg, cfg.repeats), "steps/s", f"{cfg.rm_rows} x {L} rows")
    target_mask = torch.cat([torch.zeros(cfg.dpo_rows, P, device=rt.device),
                             torch.ones(cfg.dpo_rows, N, device=rt.device)], 1)
    y, ones = rows_idx(cfg.dpo_rows), torch.ones(cfg.dpo_rows, L, device=rt.device)

    def dpo_step():
        with rt.autocast():
            loss = -model.logprobs(y, ones, target_mask).sum(1).mean()  # a DPO micro-batch's logprob work
        loss.backward()
        common.optimizer_step(model, optimizer, 1.0, rt, 0)
    row("dpo_steps_s", 1 / timed(dpo_step, cfg, cfg.repeats), "micro-batches/s",
        f"{cfg.dpo_rows} x {L} rows (chosen + rejected)")

    print(f"{'figure':28s} {'value':>12s}  unit")
    for name, value, unit, note in rows:
        print(f"{name:28s} {value:12.4g}  {unit}{'  (' + note + ')' if note else ''}")
    print("generation over the no-cache path: " + ", ".join(f"{name} {report[f'generate_{name}_vs_nocache']:.2f}x"
                                                           for name in ("cache", "static", "static_compiled")))
    return report


if __name__ == "__main__":
    common.cli(main)
