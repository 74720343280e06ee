r"""
IMDb controlled sentiment (Ziegler et al. 2019; DPO paper, Rafailov et al. 2023, section 6.1): read the
Large Movie Review Dataset (Maas et al. 2011), cut review-prefix prompts, tokenise, cache, and label pairs.

The task: a language model of movie reviews is given the first 2-8 tokens of a review and must continue it
so that a gold sentiment judge (data/judge.py) finds the continuation positive. Here we provide
  - read_reviews: the 100,000 reviews streamed from aclImdb_v1.tar.gz (never extracted to disk);
  - load_imdb: a token stream of the train + unsup reviews (pretraining / SFT text), prompts cut from the
    TRAIN reviews (for PPO and pair sampling) and from the TEST reviews (for evaluation), each with the
    review's next tokens as an SFT target, cached on disk;
  - plackett_luce_ranking: a noisy labeller that ranks K responses, preferring those the judge scores higher;
  - biased_labeller_scores: a labeller with a preference the judge does not share (the Goodhart lab's).

Data root: one folder holds both tasks, <root>/imdb/aclImdb_v1.tar.gz and <root>/hh-rlhf/... . The root
is the `data_dir` argument, else $RLHF_DATA_DIR, else this package's folder (data/), where the archive
is downloaded once (84 MB). `data_dir` may also name the imdb folder or the .tar.gz file itself.

    python -m data.imdb --data_dir=/path/to/root        # prints the summary (and builds the cache)
"""
import hashlib
import json
import os
import re
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from common import UserError, atomic_write
from data.tokenizer import GPT2_VOCAB, eot_id, get_tokenizer

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ARCHIVE = "aclImdb_v1.tar.gz"
DEFAULT_ROOT = Path(__file__).resolve().parent  # data/: the archive goes to data/imdb/ (git-ignored)
CACHE_VERSION = 2  # bump when the tokenised format or the rules change
BR = re.compile(r"<br\s*/?>", re.IGNORECASE)  # the reviews' HTML line breaks: <br />, <br/>, <br>
MEMBER = re.compile(r"aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt")  # <split>/<folder>/<id>_<stars>


# ----------------------------------------------------------------------------- the archive
def _download(dest):
    """Download the archive to dest once (common.atomic_write). Raises UserError if it fails."""
    print(f"downloading {URL} -> {dest} (84 MB, once)")
    try:
        with atomic_write(dest) as tmp, urllib.request.urlopen(URL, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # URLError, HTTPError, timeouts, a full disk
        raise UserError(f"could not download {URL} ({e}); download it by hand to {dest}, or pass "
                        f"--data_dir (or set RLHF_DATA_DIR) to the folder holding imdb/{ARCHIVE}") from None


def find_archive(data_dir=None):
    """Path of aclImdb_v1.tar.gz. data_dir (else $RLHF_DATA_DIR) may be the data root (holding
    imdb/aclImdb_v1.tar.gz), the imdb folder, or the file itself; with neither, the default root data/ is
    used and the archive downloaded there once. Raises UserError naming the path if a given data_dir holds
    no archive, or if the download fails."""
    given = data_dir or os.environ.get("RLHF_DATA_DIR") or None  # "" means "not given"
    if given is None:
        path = DEFAULT_ROOT / "imdb" / ARCHIVE
        if not path.is_file():
            _download(path)
        return path
    root = Path(given).expanduser()
    for path in (root, root / ARCHIVE, root / "imdb" / ARCHIVE):
        if path.is_file():
            return path
    how = "--data_dir" if data_dir else "RLHF_DATA_DIR"
    raise UserError(f"no IMDb archive at {root} (from {how}): expected {root / 'imdb' / ARCHIVE}; download "
                    f"{URL} there, or point {how} at the folder that holds imdb/{ARCHIVE}")


def clean(text):
    """A review's HTML line breaks (<br />, <br/>, <br>) -> "\\n"."""
    return BR.sub("\n", text)


def read_reviews(archive_path):
    """Stream the reviews out of the archive (nothing is extracted to disk).

    Returns dict "train" / "test" / "unsup" -> list[dict(text=str, label=int|None, stars=int, id=int)]:
    text is the utf-8 review with <br /> -> "\\n"; label 1 (7-10 stars, positive), 0 (1-4 stars,
    negative) or None (unsup, stars 0), read from the file name aclImdb/<split>/<pos|neg|unsup>/<id>_<stars>.txt.
    Order: each list sorted by (label, id), so negatives first, then positives (ids restart in each folder).
    Other members (README, vocab, urls_*.txt) are skipped.
    Raises UserError naming the file for a truncated or corrupt archive, a review whose stars disagree with
    its folder, or an archive with no labelled train or test review."""
    out = {"train": [], "test": [], "unsup": []}
    try:
        with tarfile.open(archive_path, "r:gz") as tar:
            for member in tar:
                m = MEMBER.fullmatch(member.name)
                if m is None or not member.isfile():
                    continue
                split, folder, rid, stars = m[1], m[2], int(m[3]), int(m[4])
                label = None if folder == "unsup" else 1 if stars >= 7 else 0 if stars <= 4 else -1
                if label == -1 or (label is not None and label != (folder == "pos")):
                    raise UserError(f"{archive_path}: member {member.name} has {stars} stars, which does not fit "
                                    f"its folder {folder!r} (pos: 7-10, neg: 1-4); is this the IMDb archive?")
                text = clean(tar.extractfile(member).read().decode("utf-8"))
                out["unsup" if folder == "unsup" else split].append(dict(text=text, label=label, stars=stars, id=rid))
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{archive_path}: cannot read the IMDb archive ({type(e).__name__}: {e}); it is probably "
                        "truncated or corrupt: delete it to download it again, or pass --data_dir to a good copy") from None
    for split in ("train", "test"):
        if not out[split]:
            raise UserError(f"{archive_path}: no aclImdb/{split}/<pos|neg>/<id>_<stars>.txt review in it; "
                            "is this the IMDb archive (aclImdb_v1.tar.gz)?")
    for rows in out.values():
        rows.sort(key=lambda r: (r["label"] or 0, r["id"]))
    return out


# ----------------------------------------------------------------------------- prompts + tokens
def _hash(*parts):
    """A stable 64-bit number from the parts (sha1; Python's hash() changes from run to run)."""
    return int.from_bytes(hashlib.sha1("/".join(map(str, parts)).encode()).digest()[:8], "big")


def prompt_length(split, review, seed=0, lo=2, hi=8):
    """k in lo..hi (uniform) for one review, fixed by (seed, split, label, id): the DPO paper's 2-8 token prefixes."""
    return lo + _hash(seed, split, review["label"], review["id"]) % (hi - lo + 1)


def make_examples(split, reviews, tokens, seed=0, lo=2, hi=8, max_response_len=56, eot=eot_id(GPT2_VOCAB)):
    """Prompt / SFT examples, one per review: list[dict(prompt=list[int], chosen=list[int], label=int|None)].
    prompt = the first k tokens of the review (k from prompt_length, at most len - 1), chosen = the next
    max_response_len tokens, + `eot` only if the review ends within them. tokens[i] are reviews[i]'s tokens;
    a review of lo tokens or fewer (no room for a response) is skipped, so every prompt has lo..hi tokens.
    collate_prompts reads "prompt"; collate_sft reads prompt + chosen."""
    out = []
    for review, toks in zip(reviews, tokens):
        if len(toks) <= lo:
            continue
        k = min(prompt_length(split, review, seed, lo, hi), len(toks) - 1)
        rest = toks[k:]
        chosen = rest + [eot] if len(rest) < max_response_len else rest[:max_response_len]
        out.append(dict(prompt=toks[:k], chosen=chosen, label=review["label"]))
    return out


def plackett_luce_ranking(gold, temperature=1.0, generator=None):
    """A noisy labeller of K answers per prompt: a ranking drawn from the Plackett-Luce model (Plackett 1975; Luce
    1959) of a human who prefers the more positive review: the best is answer i with probability
    softmax(g / temperature)_i, the next the same over the answers left, and so on. For K = 2 that is
    Bradley-Terry, P(first > second) = sigmoid((g1 - g2) / temperature) (Ziegler et al. 2019). temperature 0 is the
    judge's own order, noiseless, as in the DPO paper's IMDb setup (section 6.1).
    Drawn with the Gumbel trick: sorting g / temperature + Gumbel noise gives exactly a Plackett-Luce ranking.
    gold: (P, K) float gold scores g(x, y) (e.g. GoldJudge.log_odds). Returns (P, K) long, the answers' indices
    best first. Raises ValueError for a negative temperature."""
    if temperature < 0:
        raise ValueError(f"plackett_luce_ranking: temperature {temperature} < 0")
    keys = gold.double()  # (P, K)
    if temperature > 0:
        u = torch.rand(gold.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
        keys = keys / temperature - torch.log(-torch.log(u))  # g / T + Gumbel(0, 1)
    return keys.argsort(dim=1, descending=True, stable=True)  # (P, K)


def biased_labeller_scores(gold, answers, weight, feature="!"):
    """The score a labeller with a bias gives each answer: the judge's log-odds plus a preference the judge does
    not share, `weight` log-odds per occurrence of the string `feature` in the answer's text (not the prompt's):
        s(x, y) = g(x, y) + weight * count(feature, y)
    Labellers' systematic preferences (answer length: Singhal et al. 2023; style) are what RLHF policies learn to
    exploit (Gao et al. 2022). gold: (P, K) float; answers: P lists of K answer texts. Returns (P, K) float64.
    weight 0 is the judge itself. Raises ValueError for an empty feature or answers of another shape."""
    if not feature:
        raise ValueError("biased_labeller_scores: the feature must be a non-empty string")
    counts = torch.tensor([[a.count(feature) for a in row] for row in answers], dtype=torch.float64)  # (P, K)
    if counts.shape != gold.shape:
        raise ValueError(f"biased_labeller_scores: {tuple(counts.shape)} answers for {tuple(gold.shape)} gold scores")
    return gold.double() + weight * counts


# ----------------------------------------------------------------------------- cache
def _flat(examples):
    """examples -> arrays (label (N,) int8 with -1 for None, prompt_len (N,), chosen_len (N,), tokens (sum,) uint16)."""
    seqs = [e["prompt"] + e["chosen"] for e in examples]
    return dict(label=np.array([-1 if e["label"] is None else e["label"] for e in examples], np.int8),
                prompt_len=np.array([len(e["prompt"]) for e in examples], np.int32),
                chosen_len=np.array([len(e["chosen"]) for e in examples], np.int32),
                tokens=np.fromiter((t for s in seqs for t in s), np.uint16, sum(map(len, seqs))))


def _unflat(label, prompt_len, chosen_len, tokens):
    flat, out, i = tokens.tolist(), [], 0
    for lab, p, c in zip(label.tolist(), prompt_len.tolist(), chosen_len.tolist()):
        out.append(dict(prompt=flat[i:i + p], chosen=flat[i + p:i + p + c], label=None if lab < 0 else lab))
        i += p + c
    return out


def _pct(x):
    return {q: int(np.percentile(x, int(q[1:]))) for q in ("p10", "p50", "p90", "p99")} | {"max": int(max(x))}


def _build(archive, max_response_len, min_prompt_len, max_prompt_len, seed, max_reviews, vocab_size):
    """Read and tokenise the archive: (splits dict "train"/"test" -> examples, stream (N,) uint16, summary)."""
    t0 = time.time()
    reviews = read_reviews(archive)
    t1 = time.time()
    for split, rows in reviews.items():  # the fixed shuffle; max_reviews keeps a prefix of it
        rows.sort(key=lambda r: _hash(split, r["label"], r["id"]))
        reviews[split] = rows[:max_reviews] if max_reviews else rows
    enc, eot = get_tokenizer(vocab_size), eot_id(vocab_size)
    tokens = {s: enc.encode_ordinary_batch([r["text"] for r in rows]) for s, rows in reviews.items()}
    t2 = time.time()
    splits = {s: make_examples(s, reviews[s], tokens[s], seed, min_prompt_len, max_prompt_len, max_response_len, eot)
              for s in ("train", "test")}
    docs = tokens["train"] + tokens["unsup"]
    stream = np.fromiter((t for d in docs for t in d + [eot]), np.uint16, sum(len(d) + 1 for d in docs))
    lens = {s: [len(t) for t in toks] for s, toks in tokens.items()}
    summary = dict(archive=str(archive), reviews={s: len(r) for s, r in reviews.items()},
                   positive={s: sum(r["label"] == 1 for r in reviews[s]) for s in ("train", "test")},
                   review_tokens={s: _pct(v) for s, v in lens.items() if v},
                   examples={s: len(v) for s, v in splits.items()}, text_tokens=len(stream),
                   prompt_lengths={s: np.bincount([len(e["prompt"]) for e in v], minlength=max_prompt_len + 1)
                                   .tolist() for s, v in splits.items()},
                   seconds=dict(read=round(t1 - t0, 2), tokenize=round(t2 - t1, 2),
                                examples=round(time.time() - t2, 2)))
    return splits, stream, summary


def _save_cache(path, splits, stream, summary):
    """Write the cache .npz atomically (common.atomic_write: a reader never sees half a file)."""
    arrays = {f"{s}_{k}": v for s in splits for k, v in _flat(splits[s]).items()}
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object, so that numpy adds no .npz suffix
        np.savez(f, text_tokens=stream, summary=np.array(json.dumps(summary)), **arrays)


def _load_cache(path):
    """(splits, stream, summary) from a cache .npz, or None (with a note) if it cannot be read."""
    try:
        with np.load(path) as z:
            blob = {k: z[k] for k in z.files}
        splits = {s: _unflat(*(blob[f"{s}_{k}"] for k in ("label", "prompt_len", "chosen_len", "tokens")))
                  for s in ("train", "test")}
        return splits, blob["text_tokens"], json.loads(str(blob["summary"]))
    except Exception as e:  # a damaged cache is rebuilt, never fatal
        print(f"note: cannot read the cache {path} ({type(e).__name__}: {e}); rebuilding it")
        return None


def load_imdb(data_dir=None, cache_dir="data/cache", verbose=True, max_response_len=56, min_prompt_len=2,
              max_prompt_len=8, seed=0, max_reviews=0, vocab_size=GPT2_VOCAB):
    """The tokenised IMDb task, cached on disk. Returns a dict:
      text_tokens: (N,) LongTensor, every train and unsup review, each followed by one EOT (the format of
          data.pretraining_tokens, for data.sample_text_batch);
      train_prompts / test_prompts: list[dict(prompt=list[int], chosen=list[int], label=0|1)], one per
          labelled TRAIN / TEST review (see make_examples), in a fixed shuffled order (sha1 of the review's
          split, label and id), so that any prefix (test_prompts[:128]) holds both labels;
      sft_train / sft_test: the same lists (collate_sft reads prompt + chosen);
      summary: counts, label balance, token lengths, the settings and the seconds each step took.
    max_reviews > 0 keeps that many reviews of each split (the first in the shuffled order), for quick runs.
    The cache (an .npz, written atomically) in cache_dir (None or "" disables it) is keyed by the archive
    (path, size, mtime) and every setting; an unreadable one is rebuilt.
    Raises UserError for bad settings or a missing / bad archive."""
    if not 1 <= min_prompt_len <= max_prompt_len or max_response_len < 1 or max_reviews < 0:
        raise UserError(f"need 1 <= min_prompt_len ({min_prompt_len}) <= max_prompt_len ({max_prompt_len}), "
                        f"max_response_len ({max_response_len}) >= 1, max_reviews ({max_reviews}) >= 0")
    archive = find_archive(data_dir)
    settings = dict(max_response_len=max_response_len, min_prompt_len=min_prompt_len,
                    max_prompt_len=max_prompt_len, seed=seed, max_reviews=max_reviews, vocab_size=vocab_size)
    st = archive.stat()
    key = hashlib.sha1(json.dumps(dict(version=CACHE_VERSION, archive=str(archive.resolve()), size=st.st_size,
                                       mtime=st.st_mtime_ns, **settings)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"imdb_{key}.npz" if cache_dir else None
    t0 = time.time()
    cached = _load_cache(path) if path is not None and path.is_file() else None
    if cached is not None:
        splits, stream, summary = cached
        summary["seconds"] = {"cache_load": round(time.time() - t0, 2)}
        if verbose:
            print(f"loaded tokenised IMDb from cache {path}")
    else:
        splits, stream, summary = _build(archive, **settings)
        summary["settings"] = settings
        if path is not None:
            _save_cache(path, splits, stream, summary)
    if verbose:
        print_summary(summary)
    return dict(text_tokens=torch.from_numpy(stream.astype(np.int64)), train_prompts=splits["train"],
                test_prompts=splits["test"], sft_train=splits["train"], sft_test=splits["test"], summary=summary)


def print_summary(s):
    """Print the summary dict of load_imdb."""
    print(f"IMDb from {s['archive']}; settings: " + ", ".join(f"{k}={v}" for k, v in s["settings"].items()))
    print("  reviews: " + ", ".join(f"{k} {v:,}" for k, v in s["reviews"].items()) +
          "; positive: " + ", ".join(f"{k} {v:,}" for k, v in s["positive"].items()))
    for k, v in s["review_tokens"].items():
        print(f"  {k} review tokens: " + ", ".join(f"{q} {n}" for q, n in v.items()))
    print(f"  text stream (train + unsup, EOT-separated): {s['text_tokens']:,} tokens")
    for k, v in s["prompt_lengths"].items():
        print(f"  {k} prompts: {s['examples'][k]:,}; by length " +
              ", ".join(f"{n}: {c}" for n, c in enumerate(v) if c))
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))


def main():
    import argparse
    ap = argparse.ArgumentParser(description="print the IMDb summary (and build the cache)")
    for k, v in dict(data_dir="", cache_dir="data/cache", max_response_len=56, min_prompt_len=2,
                     max_prompt_len=8, seed=0, max_reviews=0, vocab_size=GPT2_VOCAB).items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    t0 = time.time()
    d = load_imdb(**vars(ap.parse_args()))
    enc = get_tokenizer(d["summary"]["settings"]["vocab_size"])
    for split in ("train_prompts", "test_prompts"):
        print(f"  first {split} (prompt | reference continuation):")
        for e in d[split][:4]:
            print(f"    [{e['label']}] {enc.decode(e['prompt'])!r} | {enc.decode(e['chosen'][:16])!r}...")
    print(f"  took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    from common import cli
    cli(main)
