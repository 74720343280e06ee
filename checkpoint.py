"""
Checkpoints of every stage: one file per stage (out/<task>/sft.pt, rm.pt, ppo.pt, dpo.pt) holding the model's
shape (model_args, with its vocabulary n_tokens), its weights, the stage's config and which stage wrote it, plus
whatever a stage adds to resume (optimiser, step, RNG states: save_training_state). Written atomically; loading one
that is missing, damaged, of another stage or of another vocabulary is a one-line error naming the command that
writes it; load_sft loads the SFT model that reward.py and dpo.py start from. The training state lives here too:
what a checkpoint of a run holds (save_training_state, restore_training_state, rng_state), when one is due
(checkpoint_due) and what --resume=True continues from (resume_checkpoint, start_training).
"""
import importlib
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

import common
from common import Diverged, UserError, atomic_write
from model import GPT, GPTConfig, GPT2_TOKENS


def _raw(model):
    """The plain GPT inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# the stages' checkpoints (save_checkpoint's `stage`) and the command that writes each one
STAGE_COMMANDS = {"sft": "python sft.py", "rm": "python reward.py", "ppo": "python ppo.py", "dpo": "python dpo.py"}


def save_checkpoint(path, model, config, stage, **extra):
    """Save {"model_args", "model" (state_dict without "_orig_mod."/"module." prefixes), "config" (the
    stage's config: dict or namespace), "stage" (a key of STAGE_COMMANDS), **extra}; model_args.n_tokens
    records the vocabulary
    to path, atomically: a temporary file in the same folder, then os.replace, so a kill at any moment
    leaves the previous checkpoint loadable. Raises common.Diverged (and writes nothing) if a weight is
    nan or inf: a spoiled model never overwrites a good checkpoint."""
    raw = _raw(model)
    sd = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in raw.state_dict().items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise Diverged(f"not saving {path}: weights {bad[:3]} hold nan/inf; the file on disk is left as it was")
    ckpt = dict(model_args=asdict(raw.config), model=sd, stage=stage,
                config=config if isinstance(config, dict) else vars(config), **extra)
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path, device="cpu", stage=None, vocab_size=None):
    """Load a checkpoint dict written by save_checkpoint (tensors on device). Only load files you trust
    (pickle). stage: the stage (or tuple of stages) the caller expects, e.g. "rm"; None accepts any.
    Raises common.UserError, one line naming the file and the command that writes it, when the file is
    missing, damaged (truncated, not a torch file) or not a checkpoint of this project, or of another stage, or
    (vocab_size given) of another vocabulary: its tokens would mean other words."""
    want = (stage,) if isinstance(stage, str) else tuple(stage or ())
    fix = " or ".join(f"`{STAGE_COMMANDS[s]}`" for s in want) or "the stage that wrote it"
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} not found: {fix} writes it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated zip, a text file, a pickle of something else
        why = str(e).split(". ")[0][:100]  # the first sentence of torch's message
        raise UserError(f"{path} is damaged or not a checkpoint of this project ({type(e).__name__}: {why}); "
                        f"{fix} writes it again") from None
    if not isinstance(ckpt, dict) or not {"model_args", "model", "stage"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of this project; {fix} writes it again")
    if want and ckpt["stage"] not in want:
        raise UserError(f"{path} is a {ckpt['stage']} checkpoint (written by `{STAGE_COMMANDS.get(ckpt['stage'])}`), "
                        f"but a {' or '.join(want)} checkpoint is expected here: {fix} writes one")
    n_tokens = ckpt["model_args"].get("n_tokens", GPT2_TOKENS)
    if vocab_size is not None and n_tokens != vocab_size:
        raise UserError(f"{path} was trained with a vocabulary of {n_tokens} tokens, but --vocab_size={vocab_size} "
                        f"here: pass --vocab_size={n_tokens}, or write it again with --vocab_size={vocab_size}")
    return ckpt


# model_args keys that GPTConfig has renamed since: old name -> current name. "vocab_size" was the embedding's
# row count, now GPTConfig.padded_vocab_size (the setting --vocab_size is the real token count, model_args.n_tokens).
RENAMED_MODEL_ARGS = {"vocab_size": "padded_vocab_size"}


def model_args(ckpt):
    """A copy of a checkpoint's model_args with GPTConfig's current field names: a checkpoint written before a
    rename (RENAMED_MODEL_ARGS) loads as it did."""
    return {RENAMED_MODEL_ARGS.get(k, k): v for k, v in ckpt["model_args"].items()}


def model_from_checkpoint(ckpt, scalar_head=None):
    """Build the GPT of a checkpoint dict (on CPU, float32). scalar_head=True on a checkpoint without a
    head adds a freshly initialised one; False drops it; None keeps what the checkpoint has. Raises UserError
    when the weights do not fit the model_args (a damaged file, or one of another version)."""
    args = model_args(ckpt)
    if scalar_head is not None:
        args["scalar_head"] = scalar_head
    model = GPT(GPTConfig(**args))
    sd = {k.replace("_orig_mod.", ""): v for k, v in ckpt["model"].items()}
    if not args["scalar_head"]:
        sd = {k: v for k, v in sd.items() if not k.startswith("scalar_head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("scalar_head.") for k in missing):
        stage = ckpt.get("stage")
        raise UserError(f"this {stage} checkpoint's weights do not fit its model_args (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): it is damaged or of another version; "
                        f"`{STAGE_COMMANDS.get(stage, 'the stage that wrote it')}` writes it again")
    return model


def load_sft(cfg, path="", dropout=None):
    """(path, checkpoint dict) of the SFT model a stage starts from (reward.py, dpo.py): `path`, or <out_dir>/sft.pt
    when it is "". dropout: None keeps the SFT model's, a number replaces it in model_args (dpo.py passes 0.0 so that
    pi is deterministic and equals pi_ref at the start; reward.py's reward model trains with the SFT dropout).
    Raises UserError for a missing or wrong file (load_checkpoint: of another stage, or of a vocabulary other than
    cfg.vocab_size) or a cfg.block_size beyond its model's."""
    path = path or os.path.join(cfg.out_dir, "sft.pt")
    ckpt = load_checkpoint(path, stage="sft", vocab_size=cfg.vocab_size)
    if dropout is not None:
        ckpt["model_args"]["dropout"] = dropout
    if cfg.block_size > ckpt["model_args"]["block_size"]:
        raise UserError(f"--block_size={cfg.block_size} exceeds the block_size {ckpt['model_args']['block_size']} "
                        f"of {path}")
    return path, ckpt


def make_missing_checkpoints(cfg, *stages):
    """Write the checkpoints of `stages` (e.g. "sft", "rm") that <out_dir> lacks, or that a killed run left
    unfinished, by running the stage that writes each one (STAGE_COMMANDS: sft.py, reward.py, ...) with its own
    defaults plus the settings every stage shares (common.shared_flags), --resume=True for an unfinished one:
    `python ppo.py` on a fresh machine runs the whole pipeline."""
    for stage in stages:
        path = os.path.join(cfg.out_dir, f"{stage}.pt")
        unfinished = os.path.exists(path) and not load_checkpoint(path, stage=stage).get("finished", True)
        if unfinished or not os.path.exists(path):
            script = STAGE_COMMANDS[stage].split()[-1]  # reward.py
            print(f"{path} is {'unfinished' if unfinished else 'missing'}: running `python {script}"
                  f"{' --resume=True' if unfinished else ''}` (its default settings) first")
            module = importlib.import_module(script[:-3])  # imported here only: no stage needs another's code
            module.main(common.shared_flags(cfg, module.config) + (["--resume=True"] if unfinished else []))


# ----------------------------------------------------------------------------- training state and resume
def checkpoint_due(step, cfg, final_step):
    """True after `step` optimiser steps when a checkpoint is due: every cfg.checkpoint_every steps and at
    the end."""
    return step == final_step or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)


def rng_state(generators, rt):
    """The RNG states a resumed run needs to draw the same random numbers: torch's global RNG (and CUDA's)
    and each named torch.Generator of the stage (batch order, sampler), of every DDP rank (a collective:
    every rank calls it). Returns a list with one dict per rank."""
    state = {"torch": torch.get_rng_state(), **{name: g.get_state().cpu() for name, g in generators.items()}}
    if rt.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    states = [state]
    if rt.ddp:
        states = [None] * rt.world_size
        dist.all_gather_object(states, state)
    return states


def set_rng_state(states, generators, rt):
    """Restore this rank's part of what rng_state saved (generators: the same names, built on the same devices)."""
    state = states[rt.rank]
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(path, stage, cfg, step, final_step, rt, models, optimizers, generators, **extra):
    """Every DDP rank calls it; the master writes the stage's checkpoint (save_checkpoint: atomic, never
    nan weights) with everything --resume needs: models["model"] is the model later stages load, any other
    entry of `models` (e.g. PPO's critic) is stored under its name; the optimisers' states, the step
    (optimiser steps done), finished (step >= final_step), every rank's RNG states and **extra (e.g. PPO's
    beta and score scale)."""
    rng = rng_state(generators, rt)
    if rt.master:
        others = {name: m.state_dict() for name, m in models.items() if name != "model"}
        save_checkpoint(path, models["model"], cfg, stage, step=step, finished=step >= final_step,
                        optimizers={name: o.state_dict() for name, o in optimizers.items()}, rng=rng,
                        **others, **extra)


def restore_training_state(ckpt, rt, models, optimizers, generators):
    """Load what save_training_state wrote into the same named models, optimisers and generators (this rank's
    RNG states); returns the step to continue from. A run resumed with another number of DDP ranks raises
    UserError."""
    if len(ckpt["rng"]) != rt.world_size:
        raise UserError(f"the checkpoint was written by {len(ckpt['rng'])} process(es); resume it with as many")
    for name, m in models.items():
        m.load_state_dict(ckpt[name])
    for name, o in optimizers.items():
        o.load_state_dict(ckpt["optimizers"][name])
    set_rng_state(ckpt["rng"], generators, rt)
    return ckpt["step"]


def start_training(model, cfg, rt, ckpt, log_name, generators):
    """What a one-model stage (sft, reward, dpo) trains with: AdamW over `model` (cfg.lr, cfg.weight_decay), the
    state that save_training_state writes (restored from `ckpt` when resuming), the step to start at, and the
    stage's Logger (out/<log_name>_log.jsonl). Returns (optimizer, state, start, logger)."""
    optimizer = common.configure_optimizer(model, cfg.lr, cfg.weight_decay)
    state = dict(models=dict(model=model), optimizers=dict(model=optimizer), generators=generators)
    start = restore_training_state(ckpt, rt, **state) if ckpt else 0
    return optimizer, state, start, common.Logger(cfg.out_dir, log_name, master=rt.master, start_step=start)


def resume_checkpoint(cfg, path, stage, final_step):
    """What --resume=True continues from. Returns (ckpt, done): (None, False) for a fresh run (cfg.resume False);
    else the checkpoint dict of `path` (load_checkpoint checks it), whose "step" says where to go on, and
    done = True when that step has already reached final_step (an int, or a function of the checkpoint when the
    checkpoint decides it, as sft.py's pretraining length): the stage then has nothing to do (it says so
    here) and returns. Raises UserError when there is nothing to resume (no file, a damaged one, another
    stage's)."""
    if not cfg.resume:
        return None, False
    if not os.path.exists(path):
        raise UserError(f"--resume=True: there is no {path} to resume from; run without --resume to start afresh")
    ckpt = load_checkpoint(path, stage=stage, vocab_size=getattr(cfg, "vocab_size", None))
    final_step = final_step(ckpt) if callable(final_step) else final_step
    done = ckpt["step"] >= final_step
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {path} at step {ckpt['step']} of {final_step}" +
              (": already finished, nothing to do (raise the step count to train longer)" if done else ""))
    return ckpt, done
