r"""
Try it yourself: every policy of a run answers your own prompts, side by side, each answer scored.

    python sample.py                                   # type prompts (Ctrl-D ends); the policies of out/imdb/
    python sample.py --prompt="This movie was|I hated this film because" --num_samples=2
    python sample.py --prompt=FILE:prompts.txt         # one prompt per line (blank lines are skipped)
    python sample.py --policies=sft,ppo,out/imdb/lab/ppo_beta0.05/ppo.pt   # names and/or paths, comma-separated
    python sample.py --task=hh --prompt="How do I bake bread?"

Prompts: --prompt holds one or more prompts separated by "|" (a repeated --prompt adds more); an item FILE:path
reads one prompt per line from a file. With no --prompt, prompts are read from the terminal until EOF. Leading
and trailing spaces are dropped (the training prompts never end in one). On hh a prompt without "Assistant:" is a
bare question and is wrapped in the dataset's "\n\nHuman: ...\n\nAssistant:" frame.
Policies: --policies lists names (ppo -> <out_dir>/ppo.pt) and/or paths of .pt files (a lab run's policy, say);
empty = every one of sft, ppo, dpo found in out_dir. A lab run's folder holds links to sft.pt and rm.pt, so
--out_dir=out/imdb/lab/ppo_beta0.05 works too.

Every policy answers every prompt num_samples times with the sampler seeded afresh by --seed: the policies get
the same random numbers (a fair comparison), and a prompt's answers do not depend on the other prompts. Each
answer shows its reward-model score (<out_dir>/rm.pt, where there is one) and, on imdb, the gold judge's log-odds
that prompt + answer is a positive review; each policy's line shows their means, and after the last prompt the
means over every answer (evaluate.print_summary).
"""
import os
import sys

import torch

import common
import data
import evaluate
from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError

# ----------------------------------------------------------------------------- config
config = dict({k: common.SHARED[k] for k in ("task", "out_dir", "data_dir", "device", "dtype", "seed", "vocab_size",
                                             "max_new_tokens", "eval_batch_size")},
    prompt="",               # prompts separated by "|", or FILE:path (one per line); "" = read them from the terminal
    policies="",             # comma-separated names (sft -> <out_dir>/sft.pt) and/or .pt paths; "" = sft,ppo,dpo found
    num_samples=common.setting(3, ">= 1"),     # answers per prompt and policy
    temperature=common.setting(1.0, ">= 0"),   # sampling temperature (1 = the policy as it is, as in every
                                               # evaluation; 0 = greedy)
)
cuda_config = {k: v for k, v in common.SHARED_CUDA.items() if k in config}  # the vocabulary of a CUDA-preset run


def read_prompts(spec):
    """The prompts of a --prompt value (str): items separated by "|", each a prompt or FILE:path (one prompt per
    line, blank lines skipped). Returns a list of str. Raises UserError for an empty item, or a file that cannot be
    read or holds no prompt."""
    prompts = []
    for item in spec.split("|"):
        if item.startswith("FILE:"):
            try:
                with open(item[5:], encoding="utf-8") as f:
                    lines = [line.rstrip("\n") for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--prompt={item}: cannot read it ({type(e).__name__}: {getattr(e, 'strerror', e)}); "
                                "give a text file with one prompt per line") from None
            if not lines:
                raise UserError(f"--prompt={item}: the file holds no prompt; write one prompt per line")
            prompts += lines
        elif not item.strip():
            raise UserError(f"--prompt={spec!r} holds an empty prompt: give some text (prompts are separated by '|')")
        else:
            prompts.append(item)
    return prompts


def encode_prompt(text, cfg, context):
    """(text as the models read it, its token list) for a prompt str: stripped, framed on hh if it is a bare
    question, encoded with the task vocabulary (cfg.vocab_size). Raises UserError for an empty prompt, or one whose
    tokens + cfg.max_new_tokens exceed `context`, the models' block_size."""
    text = text.strip()
    if not text:
        raise UserError("an empty prompt: give some text")
    if cfg.task == "hh" and "Assistant:" not in text:
        text = f"\n\nHuman: {text}\n\nAssistant:"
    tokens = data.get_tokenizer(cfg.vocab_size).encode_ordinary(text)
    if len(tokens) + cfg.max_new_tokens > context:
        raise UserError(f"the prompt {text[:40]!r}... is {len(tokens)} tokens; with --max_new_tokens="
                        f"{cfg.max_new_tokens} that exceeds the models' context of {context}: shorten it, or lower "
                        "--max_new_tokens")
    return text, tokens


def load_policies(cfg, rt):
    """The policies to compare ({label: GPT}, in --policies order) and the reward model (GPT with a scalar head, or
    None without <out_dir>/rm.pt), in eval mode on rt.device. Raises UserError when out_dir is not there, no policy
    is found, or a checkpoint is missing, damaged, of another stage, vocabulary (cfg.vocab_size) or task."""
    if not os.path.isdir(cfg.out_dir):
        raise UserError(f"no run folder {cfg.out_dir}: `python ppo.py --task={cfg.task}` writes one, or pass "
                        "--out_dir= a folder holding sft.pt, ppo.pt or dpo.pt")
    names = [n.strip() for n in cfg.policies.split(",") if n.strip()] or \
        [s for s in evaluate.STAGES if os.path.exists(os.path.join(cfg.out_dir, f"{s}.pt"))]
    if not names:
        raise UserError(f"no policy in {cfg.out_dir} (sft.pt, ppo.pt, dpo.pt): `python sft.py --task={cfg.task}` "
                        "writes the first; or name checkpoints with --policies=")

    def load(path, stage, **kw):
        ckpt = load_checkpoint(path, stage=stage, vocab_size=cfg.vocab_size)
        if ckpt["config"].get("task", cfg.task) != cfg.task:
            raise UserError(f"{path} was trained on --task={ckpt['config']['task']}, but --task={cfg.task} here: "
                            f"pass --task={ckpt['config']['task']}")
        return model_from_checkpoint(ckpt, **kw).to(rt.device).eval()
    paths = {n.removesuffix(".pt"): n if n.endswith(".pt") else os.path.join(cfg.out_dir, f"{n}.pt") for n in names}
    policies = {label: load(path, evaluate.STAGES) for label, path in paths.items()}
    rm_path = os.path.join(cfg.out_dir, "rm.pt")
    reward_model = load(rm_path, "rm", scalar_head=True) if os.path.exists(rm_path) else None
    if reward_model is None:
        print(f"no reward model {rm_path} (`python reward.py --task={cfg.task}` writes it): answers are not scored")
    return policies, reward_model


def scores_text(result, i=None):
    """'RM +0.12  gold +0.34' for answer i of a sample_and_score result, or (i None) the means of its answers."""
    return "  ".join(f"{label} {(result[key].mean() if i is None else result[key][i]).item():+.2f}"
                     for key, label in (("scores", "RM"), ("gold", "gold")) if key in result)


def terminal_prompts(encode):
    """Prompts typed at the terminal, one per line, encoded by `encode`, until EOF (Ctrl-D) or Ctrl-C; blank lines
    are skipped and a prompt `encode` refuses (UserError) is reported in one line and skipped."""
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            if line.strip():
                yield encode(line)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)


def main(argv=None):
    """Answer the prompts with every policy and print the answers and their scores. argv: list of --key=value
    (None: sys.argv[1:]). Returns {policy label: sample_and_score result over all the prompts' answers}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--prompt=")]  # several --prompt: joined with "|"
    argv = [a for a in argv if not a.startswith("--prompt=")] + (["--prompt=" + "|".join(given)] if given else [])
    cfg = common.parse_config(config, argv, cuda_overrides=cuda_config)
    texts = read_prompts(cfg.prompt) if given else None  # a bad file fails before any model is loaded
    rt = common.setup_runtime(cfg)
    policies, reward_model = load_policies(cfg, rt)
    judge = data.load_judge(cfg.data_dir or None, verbose=False) if cfg.task == "imdb" else None
    context = min(m.config.block_size for m in [*policies.values(), reward_model] if m is not None)
    encode = lambda text: encode_prompt(text, cfg, context)
    if cfg.task == "hh":
        print("hh: a bare question is framed as in the dataset, '\\n\\nHuman: ...\\n\\nAssistant:'")
    if texts is not None:
        prompts = [encode(t) for t in texts]  # every prompt is checked before any is answered
    else:
        print("type a prompt and press Enter; Ctrl-D ends")
        prompts = terminal_prompts(encode)
    V, width = cfg.vocab_size, max(len(label) for label in policies)
    results = {label: [] for label in policies}
    for text, tokens in prompts:
        print(f"\nPROMPT {text!r}: answers per policy {cfg.num_samples}, sampler seed {cfg.seed}, "
              f"temperature {cfg.temperature}")
        for label, policy in policies.items():
            r = evaluate.sample_and_score(policy, None, reward_model, [dict(prompt=tokens)] * cfg.num_samples, rt,
                                          cfg.eval_batch_size, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                                          judge=judge)
            results[label].append(r)
            print(f"  {label:{width}s}  " + (f"mean {scores_text(r)}" if scores_text(r) else ""))
            for i, answer in enumerate(r["responses"]):
                print(f"  {'':{width}s}    {scores_text(r, i)}  {data.decode(answer, V)!r}")
    merged = {label: {k: sum((r[k] for r in rs), []) if k == "responses" else torch.cat([r[k] for r in rs])
                      for k in rs[0]} for label, rs in results.items() if rs}
    if merged:
        print(f"\nmeans over every answer ({len(next(iter(results.values())))} prompts x {cfg.num_samples}):")
        for label, r in merged.items():
            evaluate.print_summary(label, evaluate.summarize(r))
    return merged


if __name__ == "__main__":
    common.cli(main)
