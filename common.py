"""
What every stage script needs and none of them owns: command-line config overrides, device / dtype /
compile / DDP setup, the optimiser and learning-rate schedule, and the logger. No RLHF math lives here.

A stage script declares its defaults as a dict at the top of the file (the CPU preset) plus a dict of
overrides for a CUDA GPU, then calls

    cfg = parse_config(config, argv, cuda_overrides=cuda_config)   # python sft.py --lr=3e-4 --device=cpu
    rt = setup_runtime(cfg)                                         # device, autocast, DDP rank

Multi-process training works as in nanoGPT: `torchrun --nproc_per_node=N sft.py` starts N processes;
each one reads RANK / WORLD_SIZE from the environment, joins a process group (gloo on CPU, nccl on CUDA),
and the training loops average gradients with `all_reduce_grads` before each optimiser step.
"""
import contextlib
import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors
class UserError(Exception):
    """A mistake a user can make and fix: an unknown or ill-typed flag, data that is missing or malformed,
    a checkpoint that is missing, damaged or of another stage, lengths that do not fit, a device that is not
    there, a run that diverged. `cli` prints it as ONE line `error: ...` on stderr and exits with status 2;
    every other exception is a bug and keeps its traceback. The message names the file, line, flag or step
    at fault and says what to do."""


def cli(main):
    """Run a stage's main() as a command: a UserError becomes `error: <message>` on stderr and exit status 2."""
    import sys
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- config
class ConfigError(UserError, ValueError):
    """A command-line override that names an unknown key or has a value of the wrong type."""


def _parse_value(key, text, default):
    """Turn the string `text` into the type of `default`; raise ConfigError naming `key` if it can't."""
    want = type(default)
    try:
        if want is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if want is int:
            return int(text)
        if want is float:
            return float(text)
        return text  # str
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected a {want.__name__} (the default is {default!r})") from None


def parse_config(defaults, argv=None, cuda_overrides=None, verbose=True):
    """Build a stage's config from its defaults, the CUDA preset and `--key=value` overrides.

    Args:
        defaults: dict of key -> default value (bool, int, float or str), the CPU preset.
        argv: list of strings `--key=value` (None reads sys.argv[1:]).
        cuda_overrides: dict applied on top of the defaults when the device resolves to CUDA, before the
            command line (so the command line always wins).
    Returns:
        SimpleNamespace with every key of `defaults`; `device` is resolved from "auto" to "cuda"/"cpu"
        and `dtype` from "auto" to "bfloat16" on CUDA, "float32" elsewhere.
    Raises:
        ConfigError: an argument not of the form --key=value, an unknown key (the message lists the valid
            keys), or a value that does not parse as the default's type.
    """
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"bad argument {arg!r}: expected --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config key --{key}; valid keys: {', '.join(sorted(defaults))}")
        overrides[key] = _parse_value(key, text, defaults[key])
    for key in cuda_overrides or {}:
        if key not in defaults:
            raise ConfigError(f"cuda_overrides has unknown key {key!r}")

    cfg = dict(defaults)
    device = overrides.get("device", cfg.get("device", "cpu"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        cfg.update(cuda_overrides or {})
    cfg.update(overrides)
    cfg["device"] = device
    if cfg.get("dtype") == "auto":
        cfg["dtype"] = "bfloat16" if device.startswith("cuda") else "float32"
    if verbose and int(os.environ.get("RANK", 0)) == 0:
        preset = "CUDA" if device.startswith("cuda") else "CPU"
        print(f"config ({preset} preset; override with --key=value):")
        print("  " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    return SimpleNamespace(**cfg)


# ----------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where and how a stage runs. `master` is the process that logs, evaluates and saves."""
    device: str
    device_type: str   # "cuda" or "cpu", for torch.autocast
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        """Context manager: bf16/fp16 autocast on CUDA, a no-op in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def setup_runtime(cfg):
    """Seed, pick the device and dtype, and join a DDP process group when started by torchrun.

    Under torchrun (env RANK set) each process joins a group with the nccl backend on CUDA or gloo on
    CPU, takes cuda:LOCAL_RANK, and gets seed cfg.seed + rank (so ranks sample different data).
    Raises ValueError for an unknown dtype.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype={cfg.dtype}: expected one of {', '.join(dtypes)}")
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    device = cfg.device
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(cfg.seed + rank)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        keep_freed_memory()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, device_type, dtypes[cfg.dtype], ddp, rank, local_rank, world_size)


def keep_freed_memory():
    """CPU speed-up (glibc only; a no-op elsewhere): serve large tensors (a (B*T, 50304) logits tensor is
    hundreds of MB) from the heap and keep freed memory, instead of glibc's default of a fresh mmap per
    tensor that the kernel must fault in and zero again at every step. Measured on the 2-core machine:
    a B8 x T256 training step of the 4-layer GPT took about 40% less CPU time (most of it page faults)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse
    except (OSError, AttributeError):
        pass


def maybe_compile(model, cfg):
    """torch.compile(model) when cfg.compile is true (worth it on CUDA; it does not help on CPU)."""
    return torch.compile(model) if cfg.compile else model


def all_reduce_grads(model, rt):
    """Average every parameter's .grad over the DDP ranks (no-op in a single process).

    Used instead of wrapping the model in DistributedDataParallel, so that the stages may call any model
    method (hidden_states, logprobs, scalar), not just forward(), and still train in sync."""
    if not rt.ddp:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= rt.world_size


def all_reduce_mean(x, rt):
    """Mean of a tensor (or float) over the DDP ranks; returns a float."""
    x = torch.as_tensor(x, dtype=torch.float32, device=rt.device).detach().clone()
    if rt.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= rt.world_size
    return x.item()


def cleanup(rt):
    """Leave the DDP process group, if any."""
    if rt.ddp and dist.is_initialized():
        dist.barrier()  # let the master finish its report before any rank tears the group down
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- optimisation
def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices (dim >= 2) only, not on biases, LayerNorm gains or scalars.

    Only parameters with requires_grad are optimised (a frozen trunk is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step, max_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to min_lr_ratio * lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * coeff)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- logging
class Logger:
    """Append one JSON object per logged step to out/<stage>_log.jsonl and draw out/<stage>.png.

    `log(step, **metrics)` takes numbers (floats/ints) and strings (e.g. sampled text, kept in the jsonl,
    not plotted). `plot()` draws one small panel per numeric metric against the step. A non-master DDP
    rank writes nothing. The jsonl is started afresh by each run.
    """

    def __init__(self, out_dir, stage, master=True):
        self.master = master
        self.path = os.path.join(out_dir, f"{stage}_log.jsonl")
        self.png = os.path.join(out_dir, f"{stage}.png")
        self.stage = stage
        self.rows = []
        if master:
            os.makedirs(out_dir, exist_ok=True)
            open(self.path, "w").close()

    def log(self, step, **metrics):
        row = {"step": step}
        for k, v in metrics.items():
            row[k] = v.item() if isinstance(v, torch.Tensor) else v
        self.rows.append(row)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self):
        if not self.master or not self.rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = []
        for row in self.rows:
            keys += [k for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and k not in keys]
        cols = min(4, max(1, len(keys)))
        rows = math.ceil(len(keys) / cols) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(key, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(self.stage)
        fig.tight_layout()
        fig.savefig(self.png, dpi=90)
        plt.close(fig)
