r"""
Anthropic HH-RLHF (Bai et al. 2022, arXiv 2204.05862): read, split, tokenise, cache and batch.

Each line of `<subset>/<split>.jsonl.gz` is {"chosen": str, "rejected": str}, two whole dialogues
"\n\nHuman: ...\n\nAssistant: ..." that share everything up to the last Assistant turn. We split each
into a prompt (the text through the LAST "\n\nAssistant:") and a response (the rest), skip and count the
pairs that cannot be used, tokenise with the GPT-2 BPE (tiktoken "gpt2"), append EOT to every response,
truncate to fit block_size and cache the result on disk. The collate functions turn examples into the
padded tensors each stage needs (the conventions are in the README):
masks are float32 0/1 aligned to token positions, mask[:, t] = 1 means token t is a target.

Data dir: the `data_dir` argument, else $RLHF_DATA_DIR, else a one-time download into data/hh-rlhf/. It is
the data root that holds every task's folder (`<root>/hh-rlhf/<subset>/<split>.jsonl.gz`), or the
hh-rlhf folder itself.
With train files present the published split is used; a subset with only a test file is split
deterministically by a hash of the prompt (so no prompt lands on both sides).

    python -m data.hh_rlhf --data_dir=/path/to/data --block_size=256    # prints the summary
"""
import gzip
import hashlib
import json
import os
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common import UserError, atomic_write

EOT = 50256  # <|endoftext|> of the GPT-2 BPE, appended to every response
PAD_ID = 0  # default pad id; no code may rely on its value (the masks say what is real)
SUBSETS = ("helpful-base", "harmless-base")
ASSISTANT = "\n\nAssistant:"
URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "hh-rlhf"  # download target (git-ignored)
CACHE_VERSION = 2  # bump when the tokenised format or the rules change
SKIP_REASONS = ("prompt_mismatch", "empty_response", "identical")


@lru_cache(maxsize=None)
def get_tokenizer():
    """The GPT-2 BPE (tiktoken "gpt2", 50,257 tokens, EOT = 50256).
    Raises UserError if it can be neither loaded from TIKTOKEN_CACHE_DIR nor downloaded."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests' errors when offline with no cache
        raise UserError("could not load the GPT-2 BPE (tiktoken 'gpt2'): offline, set TIKTOKEN_CACHE_DIR to a "
                        f"folder holding tiktoken's cached gpt2 files ({type(e).__name__})") from None


def decode(tokens):
    """Text of a token list (an answer), without its <|endoftext|>: what every report prints."""
    return get_tokenizer().decode([t for t in tokens if t != EOT])


def split_dialogue(text):
    """Split one HH dialogue into (prompt, response): prompt = text through the LAST "\\n\\nAssistant:",
    response = the rest (usually starting with a space). Raises ValueError if there is no Assistant turn."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError("dialogue has no '\\n\\nAssistant:' turn")
    i += len(ASSISTANT)
    return text[:i], text[i:]


# ----------------------------------------------------------------------------- files
def _find(folder, subset, split):
    """Path of <subset>/<split>.jsonl.gz (or plain .jsonl) under folder, or None."""
    for ext in (".jsonl.gz", ".jsonl"):
        p = Path(folder) / subset / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _download(subsets):
    """Download the missing HH-RLHF files into DEFAULT_DATA_DIR once (common.atomic_write)."""
    for subset in subsets:
        for split in ("train", "test"):
            dest = DEFAULT_DATA_DIR / subset / f"{split}.jsonl.gz"
            if dest.is_file():
                continue
            url = URL.format(subset=subset, split=split)
            print(f"downloading {url} -> {dest}")
            try:
                with atomic_write(dest) as tmp, urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    f.write(r.read())
            except OSError as e:  # URLError, HTTPError, timeouts are all OSErrors
                raise UserError(f"could not download {url} ({e}). Offline? Point the loader at a local "
                                "copy of HH-RLHF: set RLHF_DATA_DIR=/path/to/data (holding hh-rlhf/) or pass "
                                "--data_dir=/path/to/data") from None


def find_files(data_dir=None, subsets=SUBSETS):
    """Resolve the data dir (argument, else $RLHF_DATA_DIR, else download into data/hh-rlhf/) and
    return (folder: Path, files: dict subset -> dict(train=Path|None, test=Path|None)).
    Raises UserError naming the folder if a subset has no file at all, or if a needed download fails."""
    data_dir = data_dir or os.environ.get("RLHF_DATA_DIR") or None  # "" means "not given"
    if data_dir is None:
        _download(subsets)
        data_dir = DEFAULT_DATA_DIR
    folder = Path(data_dir).expanduser()
    if (folder / "hh-rlhf").is_dir():  # the data root of every task
        folder = folder / "hh-rlhf"
    files = {s: {split: _find(folder, s, split) for split in ("train", "test")} for s in subsets}
    for s, f in files.items():
        if f["train"] is None and f["test"] is None:
            raise UserError(f"no HH-RLHF file for subset {s!r}: expected {folder / s}/test.jsonl.gz "
                                    "(and train.jsonl.gz); set RLHF_DATA_DIR or --data_dir to the folder "
                                    "that holds <subset>/<split>.jsonl.gz")
    return folder, files


def _read_jsonl(path):
    """Yield (line_number, chosen, rejected) from a .jsonl or .jsonl.gz file (blank lines ignored).
    Raises UserError naming the file and the 1-based line for malformed JSON or a bad field."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise UserError(f"{path}, line {n}: malformed JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
                for key in ("chosen", "rejected"):
                    if not isinstance(obj.get(key), str):
                        what = "missing" if key not in obj else f"not a string ({type(obj[key]).__name__})"
                        raise UserError(f"{path}, line {n}: field {key!r} is {what}")
                yield n, obj["chosen"], obj["rejected"]
    except (OSError, EOFError) as e:  # a truncated / corrupt gzip file
        raise UserError(f"{path}: cannot read it, damaged or truncated ({e})") from None


def _is_test(prompt, test_fraction):
    """Deterministic split: sha1(prompt) read as a number in [0, 1) < test_fraction -> test."""
    h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < test_fraction


def read_pairs(data_dir=None, subsets=SUBSETS, test_fraction=0.1, verbose=True):
    """Read HH-RLHF as text pairs. Returns (splits, summary):
    splits: dict "train"/"test" -> list[dict(prompt=str, chosen=str, rejected=str)] (chosen/rejected are
    the response texts), in file order; summary: dict with data_dir, files {name: pairs read},
    skipped {reason: count}, skipped_per_file {name: {reason: count}}, split ({name: how}), sizes.
    Skipped (and counted): chosen/rejected prompts differ, an empty (whitespace-only) response, identical
    responses. A subset with no train file is split by _is_test(prompt, test_fraction).
    Raises UserError (file + line) for malformed lines or missing files (see find_files)."""
    folder, files = find_files(data_dir, subsets)
    splits = {"train": [], "test": []}
    summary = {"data_dir": str(folder), "files": {}, "skipped": dict.fromkeys(SKIP_REASONS, 0),
               "skipped_per_file": {}, "split": {}}
    for subset, paths in files.items():
        published = paths["train"] is not None and paths["test"] is not None
        missing, only = ("train", paths["test"]) if paths["train"] is None else ("test", paths["train"])
        summary["split"][subset] = "published train/test" if published else \
            f"no {missing} file: {only.name} split {1 - test_fraction:.0%}/{test_fraction:.0%} by sha1(prompt)"
        for split in ("train", "test"):
            if paths[split] is None:
                continue
            name = f"{subset}/{paths[split].name}"
            counts, skipped = 0, dict.fromkeys(SKIP_REASONS, 0)
            for n, chosen, rejected in _read_jsonl(paths[split]):
                counts += 1
                try:
                    prompt, chosen_resp = split_dialogue(chosen)
                    prompt_r, rejected_resp = split_dialogue(rejected)
                except ValueError as e:
                    raise UserError(f"{paths[split]}, line {n}: {e}") from None
                reason = ("prompt_mismatch" if prompt != prompt_r else
                          "empty_response" if not chosen_resp.strip() or not rejected_resp.strip() else
                          "identical" if chosen_resp == rejected_resp else None)
                if reason:
                    skipped[reason] += 1
                    continue
                side = split if published else ("test" if _is_test(prompt, test_fraction) else "train")
                splits[side].append(dict(prompt=prompt, chosen=chosen_resp, rejected=rejected_resp))
            summary["files"][name] = counts
            summary["skipped_per_file"][name] = skipped
            for r in SKIP_REASONS:
                summary["skipped"][r] += skipped[r]
    for side in splits:  # mix the subsets in a fixed order, so that any prefix (test[:128]) holds both
        splits[side].sort(key=lambda ex: hashlib.sha1((ex["prompt"] + ex["chosen"]).encode("utf-8")).digest())
    summary["sizes"] = {k: len(v) for k, v in splits.items()}
    if verbose:
        print_summary(summary)
    return splits, summary


# ----------------------------------------------------------------------------- tokens + cache
def _cache_key(files, block_size, max_prompt_len, test_fraction, subsets, min_response_len):
    """sha1 of the source files (path, size, mtime) and every setting that changes the output."""
    srcs = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
            for f in files.values() for p in f.values() if p is not None]
    info = dict(version=CACHE_VERSION, files=srcs, block_size=block_size, max_prompt_len=max_prompt_len,
                test_fraction=test_fraction, subsets=list(subsets), min_response_len=min_response_len,
                tokenizer="gpt2")
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def _pct(x):
    return {"p50": int(np.percentile(x, 50)), "p90": int(np.percentile(x, 90)), "max": int(max(x))} \
        if len(x) else {}


def tokenize_pairs(splits, block_size=256, max_prompt_len=128, min_response_len=8):
    """Tokenise text pairs (as from read_pairs). Returns (token splits, stats):
    dict "train"/"test" -> list[dict(prompt=list[int], chosen=list[int], rejected=list[int])] where
    prompt = last max_prompt_len prompt tokens (left truncation), chosen/rejected = first
    block_size - len(prompt) tokens of (response + [EOT]) (so EOT may be cut). A pair whose prompt leaves
    fewer than min_response_len tokens of room is skipped and counted as "prompt_too_long"."""
    enc = get_tokenizer()
    out, stats = {}, {"prompt_too_long": 0, "truncated_prompts": 0, "truncated_responses": 0}
    lens = {"prompt": [], "response": []}
    for name, pairs in splits.items():
        toks = [enc.encode_ordinary_batch([p[k] for p in pairs]) for k in ("prompt", "chosen", "rejected")]
        out[name] = []
        for prompt, chosen, rejected in zip(*toks):
            chosen, rejected = chosen + [EOT], rejected + [EOT]
            lens["prompt"].append(len(prompt))
            lens["response"] += [len(chosen), len(rejected)]
            stats["truncated_prompts"] += len(prompt) > max_prompt_len
            prompt = prompt[-max_prompt_len:]  # keep the END of the prompt
            room = block_size - len(prompt)
            if room < min_response_len:
                stats["prompt_too_long"] += 1
                continue
            stats["truncated_responses"] += (len(chosen) > room) + (len(rejected) > room)
            out[name].append(dict(prompt=prompt, chosen=chosen[:room], rejected=rejected[:room]))
    stats["tokens"] = {k: _pct(v) for k, v in lens.items()}  # before truncation, responses with EOT
    return out, stats


def load_hh_rlhf(data_dir=None, block_size=256, max_prompt_len=128, cache_dir="data/cache", verbose=True,
                 subsets=SUBSETS, test_fraction=0.1, min_response_len=8, return_summary=False):
    """Tokenised HH-RLHF, cached on disk. Returns dict "train"/"test" -> list[dict(prompt=list[int],
    chosen=list[int], rejected=list[int])] (see tokenize_pairs for the truncation rules); with
    return_summary=True returns (that dict, summary dict). The cache file (json, written atomically)
    lives in cache_dir (None or "" disables it) and is keyed by the source files (path, size, mtime)
    and every setting. Raises UserError for bad settings, malformed data (file + line) or data that
    cannot be found or downloaded."""
    if not 0 < max_prompt_len <= block_size or min_response_len < 1 or not 0 <= test_fraction < 1:
        raise UserError(f"need 0 < max_prompt_len ({max_prompt_len}) <= block_size ({block_size}), "
                         f"min_response_len ({min_response_len}) >= 1, 0 <= test_fraction ({test_fraction}) < 1")
    _, files = find_files(data_dir, subsets)
    key = _cache_key(files, block_size, max_prompt_len, test_fraction, subsets, min_response_len)
    path = Path(cache_dir) / f"hh_rlhf_{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        with open(path) as f:
            blob = json.load(f)
        if verbose:
            print(f"loaded tokenised HH-RLHF from cache {path}")
            print_summary(blob["summary"])
    else:
        text, summary = read_pairs(data_dir, subsets, test_fraction, verbose=False)
        tokens, stats = tokenize_pairs(text, block_size, max_prompt_len, min_response_len)
        summary["skipped"]["prompt_too_long"] = stats.pop("prompt_too_long")
        summary.update(stats, sizes={k: len(v) for k, v in tokens.items()},
                       settings=dict(block_size=block_size, max_prompt_len=max_prompt_len,
                                     min_response_len=min_response_len))
        blob = dict(summary=summary, **tokens)
        if verbose:
            print_summary(summary)
        if path is not None:
            with atomic_write(path) as tmp, open(tmp, "w") as f:  # a reader never sees a half-written cache
                json.dump(blob, f)
    data = {"train": blob["train"], "test": blob["test"]}
    return (data, blob["summary"]) if return_summary else data


def print_summary(s):
    """Print a summary dict from read_pairs / load_hh_rlhf."""
    print(f"HH-RLHF from {s['data_dir']}")
    for name, n in s["files"].items():
        skips = ", ".join(f"{r} {c}" for r, c in s["skipped_per_file"][name].items())
        print(f"  {name}: {n} pairs read; skipped {skips}")
    for subset, how in s["split"].items():
        print(f"  {subset} split: {how}")
    print("  skipped in all: " + ", ".join(f"{r} {c}" for r, c in s["skipped"].items()))
    print(f"  split sizes: train {s['sizes']['train']}, test {s['sizes']['test']} pairs")
    if "tokens" in s:
        for k, v in s["tokens"].items():
            print(f"  {k} tokens before truncation: p50 {v.get('p50')}, p90 {v.get('p90')}, max {v.get('max')}")
        st = s["settings"]
        print(f"  truncated (block_size {st['block_size']}, max_prompt_len {st['max_prompt_len']}): "
              f"{s['truncated_prompts']} prompts, {s['truncated_responses']} responses")


# ----------------------------------------------------------------------------- batches
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
    target = torch.zeros_like(attention_mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        target[i, max(len(p), 1):len(p) + len(r)] = 1.0  # token 0 is never a target
    return idx, attention_mask, target


def collate_sft(examples, pad_id=PAD_ID):
    """SFT batch of prompt + chosen, right-padded. Returns dict idx (B, T) long, attention_mask (B, T)
    float32 (1 on real tokens), loss_mask (B, T) float32 (1 on chosen-response tokens: targets)."""
    idx, am, lm = _response_batch([e["prompt"] for e in examples], [e["chosen"] for e in examples], pad_id)
    return dict(idx=idx, attention_mask=am, loss_mask=lm)


def collate_pairs(examples, pad_id=PAD_ID):
    """Preference batch: rows [:B] prompt + chosen, rows [B:] prompt + rejected, right-padded to one T.
    Returns dict idx (2B, T) long, attention_mask (2B, T) float32, response_mask (2B, T) float32."""
    prompts = [e["prompt"] for e in examples] * 2
    responses = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    idx, am, rm = _response_batch(prompts, responses, pad_id)
    return dict(idx=idx, attention_mask=am, response_mask=rm)


def collate_prompts(examples, pad_id=PAD_ID):
    """Prompts for generation, LEFT-padded. Returns dict idx (B, P) long, attention_mask (B, P) float32."""
    idx, am = _pad([e["prompt"] for e in examples], pad_id, left=True)
    return dict(idx=idx, attention_mask=am)


def pretraining_tokens(examples):
    """Pretraining text: every dialogue of the examples, prompt + chosen then prompt + rejected, each
    followed by exactly one EOT. Returns a 1-D LongTensor (N,)."""
    stream = []
    for e in examples:
        for resp in (e["chosen"], e["rejected"]):
            doc = e["prompt"] + resp
            stream += doc if doc[-1:] == [EOT] else doc + [EOT]  # a truncated response lost its EOT
    return torch.tensor(stream, dtype=torch.long)


def sample_text_batch(stream, batch_size, block_size, generator=None):
    """batch_size random contiguous windows of block_size tokens of stream (N,) (nanoGPT's get_batch).
    Returns dict idx (B, block_size) long, attention_mask (B, block_size) float32 (all 1), loss_mask
    (B, block_size) float32 (1 everywhere but token 0, which has no context). Raises UserError if
    the stream is shorter than block_size."""
    if len(stream) < block_size:
        raise UserError(f"text stream has {len(stream)} tokens, fewer than block_size {block_size}")
    ix = torch.randint(len(stream) - block_size + 1, (batch_size,), generator=generator)  # (B,)
    idx = stream[ix[:, None] + torch.arange(block_size)]  # (B, T)
    loss_mask = torch.ones(batch_size, block_size)
    loss_mask[:, 0] = 0.0
    return dict(idx=idx, attention_mask=torch.ones(batch_size, block_size), loss_mask=loss_mask)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="print the HH-RLHF summary (and build the cache)")
    for k, v in dict(data_dir="", block_size=256, max_prompt_len=128, test_fraction=0.1,
                     min_response_len=8, cache_dir="data/cache").items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    load_hh_rlhf(**vars(ap.parse_args()))
