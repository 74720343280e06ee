"""
What every stage script needs and none of them owns: the settings every stage shares, command-line config
overrides, one-line errors, device / dtype / DDP setup, the optimiser step (DDP averaging, clipping, the
non-finite guard) and learning-rate schedule, and the logger. No RLHF math here; checkpoints and the training state
that --resume restores are checkpoint.py's (which imports this file, never the other way).

A stage script declares its defaults as a dict at the top of the file (the CPU preset, starting from
SHARED; a default wrapped in setting(default, allowed) also says what values it may take, e.g.
lr=setting(1e-3, ">= 0")) plus a dict of overrides for a CUDA GPU, then calls

    cfg = parse_config(config, argv, cuda_overrides=cuda_config)   # python sft.py --lr=3e-4 --device=cpu
    rt = setup_runtime(cfg)                                         # device, autocast, DDP rank

and runs as `if __name__ == "__main__": common.cli(main)`, so that a user's mistake is one line. `--help` prints every
setting with its default, the values it allows and the comment of its config line (config_help): the comments are
the help's one source, so each setting's line in a config says what it does.

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


@contextlib.contextmanager
def atomic_write(path):
    """Write a file so that no reader, and no kill at any moment, ever sees half of it: yields a temporary path in
    the same folder (created if needed) to write to, then renames it onto `path` (os.replace is atomic). If the
    block raises, the temporary file is removed and `path` is left as it was."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    """A command-line override that names an unknown key, has a value of the wrong type, or one its setting does not
    allow."""


def setting(default, allowed):
    """A config default that declares the values its setting may take; parse_config checks every stage's flags
    (and presets) against it. `allowed` is a range: "> 0", ">= 1", "< 1", "<= 1", or an interval "[0, 1]",
    "(0, 1]", "[0, 1)", "(0, 1)"; or choices: "k1 | k3". E.g. in a stage's config:

        lr=setting(1e-3, ">= 0"),  lam=setting(0.95, "[0, 1]"),  loss_type=setting("sigmoid", "sigmoid | ipo | hinge"),

    Returns the default itself (an int, float or str that works as one everywhere) holding `allowed`; a setting
    declared with a plain value takes any value of its type. Raises ValueError for a malformed declaration."""
    kind = {int: _DeclaredInt, float: _DeclaredFloat, str: _DeclaredStr}.get(type(default))
    if kind is None:
        raise ValueError(f"setting({default!r}, {allowed!r}): only int, float and str settings declare values")
    value = kind(default)
    value.allowed, value.allows = allowed, _rule(allowed)
    if not value.allows(default):
        raise ValueError(f"setting({default!r}, {allowed!r}): the default is not allowed")
    return value


class _DeclaredInt(int): pass
class _DeclaredFloat(float): pass
class _DeclaredStr(str): pass
_PLAIN = {_DeclaredInt: int, _DeclaredFloat: float, _DeclaredStr: str}


def _rule(allowed):
    """The test of a setting's `allowed` text (see setting): a function value -> bool."""
    import operator
    import re
    if "|" in allowed:
        choices = [w.strip() for w in allowed.split("|")]
        return lambda v: v in choices
    ops = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
    m = re.fullmatch(r"(>=?|<=?) *(\S+)", allowed.strip())
    if m:
        op, bound = ops[m[1]], float(m[2])
        return lambda v: op(v, bound)
    m = re.fullmatch(r"([\[(]) *(\S+?) *, *(\S+?) *([\])])", allowed.strip())
    if m:
        low, high = ops[">=" if m[1] == "[" else ">"], ops["<=" if m[4] == "]" else "<"]
        a, b = float(m[2]), float(m[3])
        return lambda v: low(v, a) and high(v, b)
    raise ValueError(f"allowed={allowed!r}: expected a range ('> 0', '[0, 1]', ...) or choices ('a | b')")


def _describe(allowed):
    """`allowed` in words, for an error message: "one of k1, k3", "a value >= 1", "a value in [0, 1]"."""
    if "|" in allowed:
        return "one of " + ", ".join(w.strip() for w in allowed.split("|"))
    return f"a value {'in ' if allowed.strip()[0] in '[(' else ''}{allowed.strip()}"


def allowed(defaults, key):
    """What a config's setting `key` may take: its setting() declaration's text, or None when it declares none."""
    return getattr(defaults[key], "allowed", None)


# The settings every stage must agree on, declared once: each stage's config starts with **SHARED, and
# ppo.py passes them on when it runs sft.py / reward.py for a missing checkpoint.
SHARED = dict(
    task=setting("imdb", "imdb | hh"),  # IMDb sentiment (with a gold judge) | Anthropic HH-RLHF
    out_dir="",              # checkpoints, logs and charts of every stage; "" = out/<task>
    data_dir="",             # the data root (holding imdb/, hh-rlhf/); "" = $RLHF_DATA_DIR, else download into data/
    device="auto",           # auto | cpu | cuda | cuda:N
    dtype="auto",            # auto (bfloat16 on a CUDA GPU that has it, float32 elsewhere) | float32 | bfloat16
    compile=False,           # torch.compile the training forward (measured: helps neither on CPU nor on an H200)
    fast_generation=False,   # sample with speed.StaticGenerator (static KV cache; a CUDA graph per decode step on
                             # CUDA): the same tokens as model.generate, the readable reference
    seed=setting(1337, ">= 0"),  # the random seed: initial weights, data order, sampling
    vocab_size=setting(8192, "[257, 50257]"),  # GPT-2's BPE cut to its first merges (data/tokenizer.py); 50257 = all
    block_size=setting(256, ">= 2"),      # tokens of prompt + response the models see
    max_prompt_len=setting(128, ">= 1"),  # prompts are cut to their last max_prompt_len tokens
    max_new_tokens=setting(48, ">= 1"),   # answer length cap: PPO's rollouts and every evaluation
    eval_prompts=setting(256, ">= 0"),    # the evaluation set: the first eval_prompts test prompts (0 = all)
    eval_seed=setting(0, ">= 0"),         # the sampler seed of the evaluation set's answers (at temperature 1)
    eval_batch_size=setting(128, ">= 1"),  # sequences per no-grad forward in evaluations and sampling
    checkpoint_every=setting(100, ">= 0"),  # steps between checkpoints (and one at the end); 0 = only at the end
    resume=False,            # continue from <out_dir>/<stage>.pt up to the same final step
)
def shared_flags(cfg, accepted=SHARED):
    """The --key=value flags of the settings every stage shares (SHARED, those also in `accepted`), as one
    stage passes them on to another it runs (ppo.py to sft.py and reward.py, lab.py to ppo.py and dpo.py);
    resume and checkpoint_every belong to each run and are not passed on."""
    return [f"--{k}={getattr(cfg, k)}" for k in SHARED if k in accepted and k not in ("resume", "checkpoint_every")]


SHARED_CUDA = dict(vocab_size=50257, fast_generation=True, block_size=512, max_prompt_len=256, max_new_tokens=128,
                   eval_prompts=1024, eval_batch_size=128, checkpoint_every=500)


# old flag -> the flag that replaced it (one name per idea in every stage)
RENAMED = dict(eval_interval="eval_every", log_interval="log_every")


def _parse_value(key, text, default):
    """Turn the string `text` into the type of `default` (a float: a finite one); raise ConfigError naming `key` if it
    can't."""
    want = next(t for t in (bool, int, float, str) if isinstance(default, t))
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
        if want is float and math.isfinite(float(text)):
            return float(text)
        if want is str:
            return text
        raise ValueError
    except ValueError:
        what = {float: "a finite float", int: "an int", bool: "a bool"}.get(want, f"a {want.__name__}")
        raise ConfigError(f"--{key}={text}: expected {what} (the default is {want(default)!r})") from None


def parse_config(defaults, argv=None, cuda_overrides=None, verbose=True):
    """Build a stage's config from its defaults, the CUDA preset and `--key=value` overrides.

    `--help` or `-h` anywhere in argv prints config_help of the script that called (its module docstring's usage
    lines and the comments of its `defaults`, found among its globals) and exits with status 0, before anything
    else happens.

    Args:
        defaults: dict of key -> default value (bool, int, float or str), the CPU preset.
        argv: list of strings `--key=value` (None reads sys.argv[1:]).
        cuda_overrides: dict applied on top of the defaults when the device resolves to CUDA, before the
            command line (so the command line always wins).
    Returns:
        SimpleNamespace with every key of `defaults`; `device` is resolved from "auto" to "cuda"/"cpu"
        and `dtype` from "auto" to "bfloat16" on CUDA, "float32" elsewhere; an empty `out_dir` becomes
        out/<task>.
    Raises:
        SystemExit(0): after printing the help.
        ConfigError: an argument not of the form --key=value, an unknown key (the message names the closest key,
            or lists the valid keys when none is close), a value that does not parse as the default's type (or a
            float that is nan or inf), a value its setting() declaration does not allow, or a CUDA device on a
            machine without one.
    """
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in argv):
        # the module whose code called: its docstring and the comments of its declaration of `defaults` (the dict's
        # name among its globals), so that a script has --help by calling parse_config, passing nothing more
        caller = sys._getframe(1).f_globals
        print(config_help(defaults, cuda_overrides, caller.get("__doc__"), caller.get("__file__"),
                          next((name for name, value in caller.items() if value is defaults), None)))
        raise SystemExit(0)
    overrides = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or "=" not in arg:
            value = argv[i + 1] if arg.startswith("--") and i + 1 < len(argv) else ""
            if value and not value.startswith("-"):
                raise ConfigError(f"bad argument {arg!r} {value!r}: expected --key=value, here {arg}={value} "
                                  "(see --help)")
            raise ConfigError(f"bad argument {arg!r}: expected --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key in RENAMED and RENAMED[key] in defaults:
            raise ConfigError(f"--{key} was renamed --{RENAMED[key]} (the same meaning): pass --{RENAMED[key]}={text}")
        if key not in defaults:
            import difflib
            near = difflib.get_close_matches(key, defaults, n=1)
            raise ConfigError(f"unknown config key --{key}: " + (f"did you mean --{near[0]}?" if near else
                              f"valid keys: {', '.join(sorted(defaults))}") + " (see --help)")
        overrides[key] = _parse_value(key, text, defaults[key])
    for key in cuda_overrides or {}:
        if key not in defaults:
            raise ConfigError(f"cuda_overrides has unknown key {key!r}")

    cfg = dict(defaults)
    device = overrides.get("device", cfg.get("device", "cpu"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device}: CUDA is not available here (torch {torch.__version__}, "
                          f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                          "pass --device=cpu, or --device=auto to pick what there is")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device={device}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        cfg.update(cuda_overrides or {})
    cfg.update(overrides)
    cfg["device"] = device
    for key, value in cfg.items():  # what each setting declares it allows (common.setting), presets included
        rule = allowed(defaults, key)
        if rule and not defaults[key].allows(value):
            raise ConfigError(f"--{key}={value}: expected {_describe(rule)}")
    cfg = {k: _PLAIN[type(v)](v) if type(v) in _PLAIN else v for k, v in cfg.items()}  # int, float, str again
    if cfg.get("dtype") == "auto":
        cfg["dtype"] = auto_dtype(device)
    if cfg.get("out_dir") == "" and "task" in cfg:
        cfg["out_dir"] = os.path.join("out", cfg["task"])
    if verbose and int(os.environ.get("RANK", 0)) == 0:
        preset = "CUDA" if device.startswith("cuda") else "CPU"
        print(f"config ({preset} preset; override with --key=value; --help says what each one does):")
        print("  " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    return SimpleNamespace(**cfg)


# ----------------------------------------------------------------------------- --help
HELP_FLAGS = ("--help", "-h")
SHARED_HEADING = "shared by every stage (common.SHARED; ppo.py and lab.py pass them on to the stages they run)"


def setting_comments(path, name):
    """What a source file says about each setting of its top-level `name = dict(...)` declaration, read from the
    comments where a reader of the file sees them (so they are the one source of --help's words):

        config = dict(common.SHARED,         # on the opening line: about the dict, no key's
            # rollout                        <- a line of its own at the keys' indent: the heading of the keys below
            iterations=setting(40, ">= 1"),  # <- the comment of the key on its line (of the last one, if several)
                                             # <- a line of its own, indented further: more of that comment
        )

    Args:
        path: a Python source file.
        name: the variable the dict is assigned to (config, SHARED, ...).
    Returns:
        {key: (heading, words)} in the order declared; heading "" before the first heading, words "" for a key
        without a comment of its own.
    Raises:
        ValueError: the file has no top-level `name = dict(`.
    """
    import tokenize
    with open(path, encoding="utf-8") as f:
        tokens = list(tokenize.generate_tokens(f.readline))
    start = next((i + 3 for i, t in enumerate(tokens) if t.start[1] == 0
                  and [u.string for u in tokens[i:i + 4]] == [name, "=", "dict", "("]), None)
    if start is None:
        raise ValueError(f"{path}: no top-level `{name} = dict(`")
    found, heading, key, indent, depth = {}, "", None, 0, 0
    for i in range(start, len(tokens)):
        tok = tokens[i]
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
            if depth == 0:
                break
        elif tok.type == tokenize.NAME and depth == 1 and tokens[i + 1].string == "=":  # a key of the dict
            key, indent = tok.string, len(tok.line) - len(tok.line.lstrip())
            found[key] = (heading, "")
        elif tok.type == tokenize.COMMENT:
            words = tok.string.lstrip("#").strip()
            own_line = not tok.line[:tok.start[1]].strip()
            if key is not None and (not own_line or tok.start[1] > indent):  # the key's comment, or more of it
                found[key] = (found[key][0], f"{found[key][1]} {words}".strip())
            elif own_line:  # a heading, or its next line
                heading = f"{heading} {words}".strip() if key is None else words
                key = None
    return found


def setting_docs(defaults, path=None, name=None):
    """The heading and words of every setting of `defaults`: a key the `name = dict(...)` of the file `path` declares
    has that declaration's (setting_comments; before its first heading: the file's name), every other key
    common.SHARED's, under SHARED_HEADING. Returns {key: (heading, words)}, words "" where there is no comment."""
    own = setting_comments(path, name) if path and name else {}
    shared = setting_comments(__file__, "SHARED")
    return {k: (own[k][0] or os.path.basename(path), own[k][1]) if k in own
            else (SHARED_HEADING, shared.get(k, ("", ""))[1]) for k in defaults}


def config_help(defaults, cuda_overrides=None, doc=None, path=None, name=None):
    """A script's --help: its docstring's first paragraph and usage lines (those that start with `python ` or
    `torchrun `), then one line per setting, grouped under the headings of its config: --key=<the CPU preset's
    default> [CUDA: <the CUDA preset's value, where it differs>], the values it allows, the comment of its line.

    Args:
        defaults, cuda_overrides: as parse_config's.
        doc: the script's module docstring (None: no usage lines).
        path, name: the script's file and the variable its defaults are assigned to (see setting_docs).
    Returns:
        The text, a str.
    """
    lines = (doc or "").strip().splitlines()
    intro = []
    for line in lines:
        if not line.strip() or line.strip().startswith(("python ", "torchrun ")):
            break
        intro.append(line)
    usage = [line for line in lines if line.strip().startswith(("python ", "torchrun "))]
    out = intro + ["", "usage:"] + usage if usage else intro
    shown = lambda v: '""' if v == "" else str(v)
    kind = lambda v: {bool: "True | False", int: "int", float: "float"}.get(type(v), "text")
    cuda, groups = cuda_overrides or {}, {}
    for key, (heading, words) in setting_docs(defaults, path, name).items():
        flag = f"--{key}={shown(defaults[key])}"
        if key in cuda and cuda[key] != defaults[key]:
            flag += f" [CUDA: {shown(cuda[key])}]"
        groups.setdefault(heading, []).append((flag, allowed(defaults, key) or kind(defaults[key]), words))
    rows = [row for group in groups.values() for row in group]
    w_flag = min(36, max((len(flag) for flag, _, _ in rows), default=0))
    w_allowed = min(18, max((len(a) for _, a, _ in rows), default=0))
    out += ["", "settings, as --key=value: the default (the CPU preset) [the CUDA preset's value, where it differs],",
            "the values allowed, what it does (the CUDA preset applies on a GPU; a flag wins over both)"]
    for heading, group in groups.items():
        out += ["", heading]
        out += [f"  {flag:{w_flag}}  {a:{w_allowed}}  {words}".rstrip() for flag, a, words in group]
    return "\n".join(out)


def auto_dtype(device):
    """--dtype=auto: "bfloat16" on a CUDA GPU that has it (Ampere and newer), "float32" on the CPU and on a GPU
    without it (T4, V100: float16 would need loss scaling, which no stage does), said in one line."""
    if not device.startswith("cuda"):
        return "float32"
    if torch.cuda.is_bf16_supported():
        return "bfloat16"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dtype=float32: {torch.cuda.get_device_name(device)} has no bfloat16 (float16 would need loss scaling)")
    return "float32"


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
    fast_generation: bool = False  # sample with speed.StaticGenerator (speed.generate_fn)

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
    Raises ConfigError for an unknown dtype.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if cfg.dtype == "float16":  # fp16 gradients underflow unless the loss is scaled, which no stage does
        raise ConfigError("--dtype=float16 is not supported (its gradients underflow without loss scaling): "
                          "use --dtype=bfloat16, which has float32's range")
    if cfg.dtype not in dtypes:
        raise ConfigError(f"--dtype={cfg.dtype}: expected one of {', '.join(dtypes)}")
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
    return Runtime(device, device_type, dtypes[cfg.dtype], ddp, rank, local_rank, world_size,
                   getattr(cfg, "fast_generation", False))


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


def all_reduce_grads(model, rt):
    """Average every parameter's .grad over the DDP ranks (no-op in a single process), in ONE collective: the
    gradients are copied into one flat buffer, all-reduced, and copied back (what DistributedDataParallel's buckets
    do, with a single bucket), instead of one all-reduce per parameter tensor.

    Used instead of wrapping the model in DistributedDataParallel, so that the stages may call any model
    method (hidden_states, logprobs, scalar), not just forward(), and still train in sync."""
    if not rt.ddp:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,) one buffer
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= rt.world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def global_std(x, rt):
    """Sample standard deviation (n - 1) of a 1-D tensor over the union of every DDP rank's entries (not the
    mean of the ranks' standard deviations): all-reduces n and sum x, then the sum of squares about the global mean
    (two passes: the one-pass Sx2 - Sx^2 / n cancels catastrophically, e.g. seven scores of 3.3 gave 5e-8, not ~0).
    Returns a float."""
    x = x.detach().double().flatten()
    stats = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
    if rt.ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    n, total = stats.tolist()
    sq = ((x - total / n) ** 2).sum()  # this rank's squares about the global mean
    if rt.ddp:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    return (sq.item() / max(n - 1, 1)) ** 0.5  # Var = sum (x - mean)^2 / (n - 1)


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


def to_device(batch, rt):
    """A collated batch (dict of tensors) on rt.device."""
    return {k: v.to(rt.device) for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(*models):
    """Put the models in eval mode (no dropout) for the block, then restore each one's train/eval mode."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, t in zip(models, was_training):
            m.train(t)


def subset(examples, n, seed=0):
    """A fixed random subset of n examples (all of them, shuffled, if n is 0 or too large), the same on every
    DDP rank and in every run for a given seed."""
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[:n if 0 < n < len(examples) else len(examples)]]


# ----------------------------------------------------------------------------- optimisation
def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices (dim >= 2) only, not on biases, LayerNorm gains or scalars; on CUDA the
    fused kernel (one launch for every parameter, as nanoGPT), elsewhere torch's default.

    Only parameters with requires_grad are optimised (a frozen trunk is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


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


class Diverged(UserError):
    """A loss or gradient norm that is nan or inf: the stage stops before the step that would spoil its
    weights, and the checkpoint on disk (the last good one) is left as it is."""


def check_finite(step, **figures):
    """Raise Diverged naming the step and the figure if any of figures (floats or 0-d tensors) is nan/inf."""
    for name, value in figures.items():
        value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(value):
            raise Diverged(f"training diverged at step {step}: {name} = {value}. Nothing was saved after the last "
                           "checkpoint, which is left as it was; lower --lr (or raise --grad_clip / --beta) "
                           "and run again (--resume=True continues from that checkpoint)")


def optimizer_step(model, optimizer, grad_clip, rt, step):
    """One optimiser step, the same in every stage: average the gradients over the DDP ranks, measure their
    global norm (stop with Diverged if it is nan/inf, before the weights change), clip it to grad_clip
    when grad_clip > 0 (0 = no clipping: the gradient is used as it is), step, zero the gradients.
    Returns the gradient norm before clipping (float)."""
    all_reduce_grads(model, rt)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))  # inf: scale 1
    check_finite(step, grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


# ----------------------------------------------------------------------------- logging
class Logger:
    """Append one JSON object per logged step to out/<stage>_log.jsonl and draw out/<stage>.png.

    `log(step, **metrics)` takes numbers (floats/ints) and strings (e.g. sampled text, kept in the jsonl,
    not plotted). `plot()` draws one small panel per numeric metric against the step (x_label names it), and
    lists a metric that never changed (beta without adaptive KL, ptx_loss without ptx) in the title instead
    of a flat panel. A non-master DDP rank writes nothing. A fresh run starts the jsonl afresh; a resumed run
    (start_step > 0) keeps the rows of the steps before start_step and drops the rest (they are about to be
    redone).
    """

    def __init__(self, out_dir, stage, master=True, start_step=0, x_label="step"):
        self.master, self.x_label = master, x_label
        self.path = os.path.join(out_dir, f"{stage}_log.jsonl")
        self.png = os.path.join(out_dir, f"{stage}.png")
        self.stage = stage
        self.rows = []
        if start_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                self.rows = [row for row in map(json.loads, f) if row["step"] < start_step]
        if master:
            os.makedirs(out_dir, exist_ok=True)
            with open(self.path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.rows)

    def log(self, step, **metrics):
        row = {"step": step}
        for k, v in metrics.items():
            row[k] = v.item() if isinstance(v, torch.Tensor) else v
        self.rows.append(row)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self):
        """Draw out/<stage>.png. Returns (the metrics drawn, {metric: value} of those that never changed)."""
        if not self.master or not self.rows:
            return [], {}
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        series = {}  # metric -> [(step, value)], in the order the metrics were first logged
        for row in self.rows:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    series.setdefault(k, []).append((row["step"], v))
        constant = {k: pts[0][1] for k, pts in series.items() if len(pts) > 1 and len({v for _, v in pts}) == 1}
        keys = [k for k in series if k not in constant]
        cols = min(4, max(1, len(keys)))
        rows = math.ceil(len(keys) / cols) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
        for i, (ax, key) in enumerate(zip(axes.flat, keys)):
            pts = series[key]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(key, fontsize=9)
            ax.tick_params(labelsize=7)
            if i + cols >= len(keys):  # the lowest panel of its column
                ax.set_xlabel(self.x_label, fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        title = f"{self.stage}: every logged metric ({os.path.basename(self.path)})"
        if constant:
            title += "\nconstant over the run: " + ", ".join(f"{k} = {v:.4g}" for k, v in constant.items())
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(self.png, dpi=90)
        plt.close(fig)
        return keys, constant
