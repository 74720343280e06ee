"""Shared test set-up: offline tokenizer, the repo on sys.path, and a tiny HH-RLHF-style data folder."""
import gzip
import json
import os
import sys
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
