r"""
Anthropic HH-RLHF (Bai et al. 2022, arXiv 2204.05862): read, split, tokenise and cache.

Each line of `<subset>/<split>.jsonl.gz` is {"chosen": str, "rejected": str}, two whole dialogues
"\n\nHuman: ...\n\nAssistant: ..." that share everything up to the last Assistant turn. We split each
into a prompt (the text through the LAST "\n\nAssistant:") and a response (the rest), skip and count the
pairs that cannot be used, tokenise with GPT-2's BPE (whole, or cut to vocab_size tokens: data/tokenizer.py),
append EOT to every response, truncate to fit block_size and cache the result on disk.

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
from pathlib import Path

import numpy as np
import torch

from common import UserError, atomic_write
from data.tokenizer import GPT2_VOCAB, eot_id, get_tokenizer

SUBSETS = ("helpful-base", "harmless-base")
ASSISTANT = "\n\nAssistant:"
URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "hh-rlhf"  # download target (git-ignored)
CACHE_VERSION = 2  # bump when the tokenised format or the rules change
SKIP_REASONS = ("prompt_mismatch", "empty_response", "identical")


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
def _cache_key(files, block_size, max_prompt_len, test_fraction, subsets, min_response_len, vocab_size=GPT2_VOCAB):
    """sha1 of the source files (path, size, mtime) and every setting that changes the output."""
    srcs = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
            for f in files.values() for p in f.values() if p is not None]
    info = dict(version=CACHE_VERSION, files=srcs, block_size=block_size, max_prompt_len=max_prompt_len,
                test_fraction=test_fraction, subsets=list(subsets), min_response_len=min_response_len,
                tokenizer=f"gpt2[:{vocab_size}]")
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def _pct(x):
    return {"p50": int(np.percentile(x, 50)), "p90": int(np.percentile(x, 90)), "max": int(max(x))} \
        if len(x) else {}


def tokenize_pairs(splits, block_size=256, max_prompt_len=128, min_response_len=8, vocab_size=GPT2_VOCAB):
    """Tokenise text pairs (as from read_pairs). Returns (token splits, stats):
    dict "train"/"test" -> list[dict(prompt=list[int], chosen=list[int], rejected=list[int])] where
    prompt = last max_prompt_len prompt tokens (left truncation), chosen/rejected = first
    block_size - len(prompt) tokens of (response + [EOT]) (so EOT may be cut). A pair whose prompt leaves
    fewer than min_response_len tokens of room is skipped and counted as "prompt_too_long"."""
    enc, eot = get_tokenizer(vocab_size), eot_id(vocab_size)
    out, stats = {}, {"prompt_too_long": 0, "truncated_prompts": 0, "truncated_responses": 0}
    lens = {"prompt": [], "response": []}
    for name, pairs in splits.items():
        toks = [enc.encode_ordinary_batch([p[k] for p in pairs]) for k in ("prompt", "chosen", "rejected")]
        out[name] = []
        for prompt, chosen, rejected in zip(*toks):
            chosen, rejected = chosen + [eot], rejected + [eot]
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
                 subsets=SUBSETS, test_fraction=0.1, min_response_len=8, return_summary=False, vocab_size=GPT2_VOCAB):
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
    key = _cache_key(files, block_size, max_prompt_len, test_fraction, subsets, min_response_len, vocab_size)
    path = Path(cache_dir) / f"hh_rlhf_{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        with open(path) as f:
            blob = json.load(f)
        if verbose:
            print(f"loaded tokenised HH-RLHF from cache {path}")
            print_summary(blob["summary"])
    else:
        text, summary = read_pairs(data_dir, subsets, test_fraction, verbose=False)
        tokens, stats = tokenize_pairs(text, block_size, max_prompt_len, min_response_len, vocab_size)
        summary["skipped"]["prompt_too_long"] = stats.pop("prompt_too_long")
        summary.update(stats, sizes={k: len(v) for k, v in tokens.items()},
                       settings=dict(block_size=block_size, max_prompt_len=max_prompt_len,
                                     min_response_len=min_response_len, vocab_size=vocab_size))
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


# ----------------------------------------------------------------------------- pretraining text
def pretraining_tokens(examples, vocab_size=GPT2_VOCAB):
    """Pretraining text of hh: the CHOSEN dialogue of every example (prompt + chosen), each followed by exactly one
    EOT. The rejected answers are left out: this stream is also PPO-ptx's "pretraining" text, and text that
    carries a preference would push up the likelihood of the answers the reward model pushes down. Returns a
    1-D LongTensor (N,)."""
    eot, stream = eot_id(vocab_size), []
    for e in examples:
        doc = e["prompt"] + e["chosen"]
        stream += doc if doc[-1:] == [eot] else doc + [eot]  # a truncated response lost its EOT
    return torch.tensor(stream, dtype=torch.long)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="print the HH-RLHF summary (and build the cache)")
    for k, v in dict(data_dir="", block_size=256, max_prompt_len=128, test_fraction=0.1,
                     min_response_len=8, cache_dir="data/cache", vocab_size=GPT2_VOCAB).items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    load_hh_rlhf(**vars(ap.parse_args()))
