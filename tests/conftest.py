"""Shared test set-up: the repo on sys.path, a tiny HH-RLHF-style data folder and a tiny synthetic IMDb archive."""
import gzip
import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tiktoken loads the GPT-2 BPE from TIKTOKEN_CACHE_DIR (offline; .ci/run sets it) or downloads it once.

_TOPICS = ["tea", "bread", "a bicycle", "a garden", "the moon", "a poem", "python", "chess",
           "a cat", "the rain", "a river", "coffee", "music", "a map", "soup", "a kite"]


def write_hh_fixture(root, n=64, subsets=("helpful-base", "harmless-base"), split="test"):
    """Write a small HH-RLHF-style folder: `<subset>/<split>.jsonl.gz` with `n` real-looking pairs each.

    Chosen responses are helpful and end politely; rejected ones are short and curt, so a reward model
    can learn the difference. Returns the folder path (str)."""
    for s, subset in enumerate(subsets):
        os.makedirs(os.path.join(root, subset), exist_ok=True)
        with gzip.open(os.path.join(root, subset, f"{split}.jsonl.gz"), "wt") as f:
            for i in range(n):
                topic = _TOPICS[(i + s) % len(_TOPICS)]
                prompt = f"\n\nHuman: Can you tell me about {topic}? (question {i})\n\nAssistant:"
                if i % 3 == 0:  # a multi-turn dialogue
                    prompt = (f"\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?"
                              f"\n\nHuman: Tell me about {topic}, please. ({i})\n\nAssistant:")
                chosen = prompt + f" Sure, I would be glad to help. {topic.capitalize()} is a lovely thing to learn about."
                rejected = prompt + " No."
                f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return str(root)


@pytest.fixture
def hh_dir(tmp_path):
    """A tiny HH-RLHF-style data folder (test files only, 64 pairs per subset)."""
    return write_hh_fixture(tmp_path / "hh")


@pytest.fixture
def one_thread():
    """Run a test with one torch thread. For tiny models on a busy 2-core machine every small op of a
    2-thread pool waits for the other core; one thread made the tiny end-to-end runs about 5x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def archive_bytes(members):
    """A .tar.gz in the published aclImdb layout (with a README member) holding `members`: name -> review text."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [("aclImdb/README", "Large Movie Review Dataset v1.0\n")] + list(members.items()):
            blob = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


_GOOD = ["great", "wonderful", "brilliant", "loved", "superb", "moving", "funny", "beautiful"]
_BAD = ["awful", "boring", "terrible", "hated", "dull", "worst", "stupid", "waste"]
_FILLER = ["the", "film", "movie", "plot", "acting", "story", "was", "and", "I", "it", "cast", "a", "very",
           "this", "ending", "music", "really", "of", "characters", "director"]


def write_imdb_fixture(root, n_train=40, n_test=12, n_unsup=10, seed=0):
    """A data root holding imdb/aclImdb_v1.tar.gz with synthetic reviews whose sentiment is set by known words:
    positive reviews mix _GOOD words into filler, negative ones _BAD words; <br /> line breaks included.
    Returns the root (str)."""
    rng = random.Random(seed)

    def review(words):
        text = " ".join(rng.choice(words if rng.random() < 0.3 else _FILLER) for _ in range(rng.randint(25, 45)))
        return text.replace(" and ", ". <br /><br />And ", 1).capitalize() + "."
    members, i = {}, 0
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            label = k % 2
            stars = rng.choice([7, 8, 9, 10]) if label else rng.choice([1, 2, 3, 4])
            members[f"aclImdb/{split}/{'pos' if label else 'neg'}/{i}_{stars}.txt"] = review(_GOOD if label else _BAD)
            i += 1
    for k in range(n_unsup):
        members[f"aclImdb/train/unsup/{i}_0.txt"] = review(_GOOD + _BAD)
        i += 1
    os.makedirs(os.path.join(root, "imdb"), exist_ok=True)
    with open(os.path.join(root, "imdb", "aclImdb_v1.tar.gz"), "wb") as f:
        f.write(archive_bytes(members))
    return str(root)


@pytest.fixture
def imdb_root(tmp_path):
    """A tiny synthetic IMDb data root (see write_imdb_fixture)."""
    return write_imdb_fixture(tmp_path / "imdb_root")



def tiny_imdb_stages(imdb_root, out):
    """Train a tiny SFT model and reward model on the synthetic IMDb archive into `out` (sft.pt, comparisons.pt,
    rm.pt), as the lab and the ladder find them after `python ppo.py`. Returns argv(**flags): these shared settings
    (tiny block, 6-token answers, 4 evaluation prompts) plus `flags`, as --key=value."""
    import reward
    import sft
    shared = dict(task="imdb", device="cpu", data_dir=imdb_root, out_dir=out, block_size=64, max_new_tokens=6,
                  eval_prompts=4, eval_batch_size=4)
    argv = lambda **kw: [f"--{k}={v}" for k, v in {**shared, **kw}.items()]
    sft.main(argv(n_layer=1, n_head=2, n_embd=32, pretrain_iters=4, pretrain_batch_size=2, sft_iters=4, batch_size=4,
                  eval_every=0, eval_examples=4, n_answers=1))
    reward.main(argv(n_prompts=8, n_test_prompts=4, answers_per_prompt=3, max_iters=2, batch_size=4, eval_every=0,
                     norm_examples=4, n_show=0))
    return argv
