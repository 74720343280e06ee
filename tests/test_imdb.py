"""Tests of data/imdb.py and data/judge.py on tiny archives and synthetic reviews the tests write themselves
(no network, no real data). Expected values are written by hand or follow from the rules, never captured
from the code under test."""
import io
import itertools
import math
import random
import urllib.error

import pytest
import torch

import conftest
import data
from common import UserError
from data import imdb, judge as judge_mod
from data.tokenizer import EOT, get_tokenizer

# member name -> review text, in the published layout aclImdb/<split>/<pos|neg|unsup>/<id>_<stars>.txt
REVIEWS = {
    "aclImdb/train/pos/0_9.txt": "A wonderful film.<br /><br />I loved the cast, the music and the ending.",
    "aclImdb/train/pos/3_7.txt": "Good fun for the whole family, and the jokes land more often than not.",
    "aclImdb/train/neg/1_2.txt": "Awful. Just awful.",
    "aclImdb/train/neg/4_1.txt": "The plot makes no sense<br/>and the acting is wooden from start to finish.",
    "aclImdb/train/unsup/2_0.txt": "I saw this on a long flight and remember very little of it, to be honest.",
    "aclImdb/test/pos/0_10.txt": "One of the best films I have seen this year; go and see it at once!",
    "aclImdb/test/neg/0_3.txt": "Dull, slow and far too long<br>I wanted my money back after ten minutes.",
}
EXPECTED = {  # split -> [(text, label, stars, id)], in read_reviews' order: (label, id)
    "train": [("Awful. Just awful.", 0, 2, 1),
              ("The plot makes no sense\nand the acting is wooden from start to finish.", 0, 1, 4),
              ("A wonderful film.\n\nI loved the cast, the music and the ending.", 1, 9, 0),
              ("Good fun for the whole family, and the jokes land more often than not.", 1, 7, 3)],
    "test": [("Dull, slow and far too long\nI wanted my money back after ten minutes.", 0, 3, 0),
             ("One of the best films I have seen this year; go and see it at once!", 1, 10, 0)],
    "unsup": [("I saw this on a long flight and remember very little of it, to be honest.", None, 0, 2)],
}


def archive_bytes(members=REVIEWS):
    return conftest.archive_bytes(members)


@pytest.fixture
def root(tmp_path):
    """A data root holding imdb/aclImdb_v1.tar.gz (the tiny archive)."""
    (tmp_path / "root" / "imdb").mkdir(parents=True)
    (tmp_path / "root" / "imdb" / imdb.ARCHIVE).write_bytes(archive_bytes())
    return tmp_path / "root"


def test_read_reviews(root):
    got = imdb.read_reviews(root / "imdb" / imdb.ARCHIVE)
    assert {s: [(r["text"], r["label"], r["stars"], r["id"]) for r in rows] for s, rows in got.items()} == EXPECTED


def test_clean_line_breaks():
    assert imdb.clean("a<br />b<br/>c<br>d<BR />e") == "a\nb\nc\nd\ne"


def test_find_archive(root, tmp_path, monkeypatch):
    path = root / "imdb" / imdb.ARCHIVE
    assert imdb.find_archive(root) == path                   # the data root
    assert imdb.find_archive(root / "imdb") == path          # the imdb folder
    assert imdb.find_archive(path) == path                   # the file itself
    monkeypatch.setenv("RLHF_DATA_DIR", str(root))
    assert imdb.find_archive() == path                       # the environment variable
    with pytest.raises(UserError, match="no IMDb archive at .*nowhere.*--data_dir"):
        imdb.find_archive(tmp_path / "nowhere")
    monkeypatch.setenv("RLHF_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere.*RLHF_DATA_DIR"):
        imdb.load_imdb(cache_dir=None, verbose=False)


def test_download_to_default_root(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_DATA_DIR", raising=False)
    monkeypatch.setattr(imdb, "DEFAULT_ROOT", tmp_path)
    dest = tmp_path / "imdb" / imdb.ARCHIVE

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(imdb.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="download it by hand to .*aclImdb_v1.tar.gz"):
        imdb.find_archive()
    assert list((tmp_path / "imdb").iterdir()) == []  # no half-written file left behind
    monkeypatch.setattr(imdb.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive_bytes()))
    assert imdb.find_archive() == dest and len(imdb.read_reviews(dest)["train"]) == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_archive_is_a_user_error(root, damage):
    path = root / "imdb" / imdb.ARCHIVE
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2] if damage == "truncated" else b"not a gzip file" * 50)
    with pytest.raises(UserError, match=f"{path}: cannot read the IMDb archive.*delete it"):
        imdb.read_reviews(path)
    with pytest.raises(UserError, match="cannot read"):
        imdb.load_imdb(root, cache_dir=None, verbose=False)


def test_stars_must_fit_the_folder(tmp_path):
    path = tmp_path / imdb.ARCHIVE
    path.write_bytes(archive_bytes({**REVIEWS, "aclImdb/train/pos/9_5.txt": "Meh."}))
    with pytest.raises(UserError, match="9_5.txt has 5 stars"):
        imdb.read_reviews(path)


def test_prompt_lengths_uniform_and_fixed():
    reviews = [dict(label=i % 2, id=i) for i in range(7000)]
    ks = [imdb.prompt_length("train", r) for r in reviews]
    counts = [ks.count(k) for k in range(2, 9)]
    assert sum(counts) == 7000 and all(abs(c - 1000) < 4 * math.sqrt(1000 * 6 / 7) for c in counts)
    assert ks == [imdb.prompt_length("train", r) for r in reviews]       # the same every time
    assert ks != [imdb.prompt_length("train", r, seed=1) for r in reviews]  # another seed, other lengths


@pytest.mark.parametrize("V", [50257, 1024])  # GPT-2's whole BPE and a cut one (data/tokenizer.py)
def test_load_imdb_prompts_and_stream(root, V):
    enc, EOT = get_tokenizer(V), V - 1
    d = imdb.load_imdb(root, cache_dir=None, verbose=False, max_response_len=6, vocab_size=V)
    toks = {s: [(enc.encode_ordinary(t), label) for t, label, _, _ in EXPECTED[s]] for s in EXPECTED}
    for split, n in (("train", 4), ("test", 2)):
        examples = d[f"{split}_prompts"]
        assert len(examples) == n and d[f"sft_{split}"] is examples
        assert sorted(e["label"] for e in examples) == [0] * (n // 2) + [1] * (n // 2)
        for e in examples:
            assert 2 <= len(e["prompt"]) <= 8
            # the review it came from: prompt + chosen (less a final EOT) is a prefix of one review of THIS split
            body = e["prompt"] + [t for t in e["chosen"] if t != EOT]
            src = [(t, label) for t, label in toks[split] if t[:len(body)] == body]
            assert len(src) == 1 and src[0][1] == e["label"]
            ends = len(src[0][0]) - len(e["prompt"]) < 6  # the review ends within max_response_len tokens
            assert e["chosen"] == (src[0][0][len(e["prompt"]):] + [EOT] if ends else body[len(e["prompt"]):][:6])
    if V == 50257:  # with GPT-2's tokens both kinds are there (fewer merges make the short review longer)
        assert any(e["chosen"][-1] == EOT for e in d["train_prompts"])    # "Awful. Just awful." ends early
        assert any(e["chosen"][-1] != EOT for e in d["train_prompts"])    # the others are cut
    # the text stream: every train and unsup review, each followed by one EOT, no test review
    stream = d["text_tokens"]
    assert stream.dtype == torch.long and stream.dim() == 1 and stream[-1].item() == EOT
    docs = [[]]
    for t in stream.tolist():
        docs.append([]) if t == EOT else docs[-1].append(t)
    assert docs.pop() == []
    assert sorted(docs) == sorted([t for t, _ in toks["train"] + toks["unsup"]])
    assert sorted(data.decode(doc, V) for doc in docs) == sorted(t for s in ("train", "unsup") for t, *_ in EXPECTED[s])
    assert stream.max().item() == EOT and all(e["prompt"] and max(e["prompt"]) < EOT for e in d["train_prompts"])
    # the collate functions accept the examples
    assert data.collate_prompts(d["test_prompts"])["idx"].shape[0] == 2
    assert data.collate_sft(d["sft_train"])["target_mask"].sum().item() == sum(len(e["chosen"]) for e in d["sft_train"])
    assert data.sample_text_batch(stream, 3, 8)["idx"].shape == (3, 8)


def test_load_imdb_cache(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = imdb.load_imdb(root, cache_dir=cache, verbose=False)
    assert len(list(cache.glob("imdb_*.npz"))) == 1

    def no_reading(path):
        raise AssertionError("read the archive instead of the cache")
    monkeypatch.setattr(imdb, "read_reviews", no_reading)
    second = imdb.load_imdb(root, cache_dir=cache, verbose=False)
    assert torch.equal(first["text_tokens"], second["text_tokens"])
    for key in ("train_prompts", "test_prompts", "sft_train", "sft_test"):
        assert first[key] == second[key]
    with pytest.raises(AssertionError, match="instead of the cache"):  # another setting, another cache file
        imdb.load_imdb(root, cache_dir=cache, verbose=False, seed=1)
    with pytest.raises(AssertionError, match="instead of the cache"):  # another vocabulary too
        imdb.load_imdb(root, cache_dir=cache, verbose=False, vocab_size=8192)
    monkeypatch.undo()
    path, = cache.glob("imdb_*.npz")
    path.write_bytes(path.read_bytes()[:100])  # a damaged cache is rebuilt
    assert imdb.load_imdb(root, cache_dir=cache, verbose=False)["test_prompts"] == first["test_prompts"]
    assert imdb.load_imdb(root, cache_dir=cache, verbose=False)["summary"]["seconds"].keys() == {"cache_load"}


def test_bad_settings(root):
    with pytest.raises(UserError, match="min_prompt_len"):
        imdb.load_imdb(root, cache_dir=None, verbose=False, min_prompt_len=5, max_prompt_len=3)


def plackett_luce_probability(g, order, T):
    """P(order) under Plackett-Luce by hand: prod over positions of exp(g / T) of the answer placed there over the
    sum of exp(g / T) of the answers not placed yet."""
    p, left = 1.0, list(order)
    for a in order:
        p *= math.exp(g[a] / T) / sum(math.exp(g[b] / T) for b in left)
        left.remove(a)
    return p


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_plackett_luce_order_frequencies_match_the_hand_computed_probabilities(T):
    g, n = [0.4, -0.6, 1.1], 20_000
    order = imdb.plackett_luce_ranking(torch.tensor([g] * n), T, torch.Generator().manual_seed(0))
    assert order.dtype == torch.long and order.shape == (n, 3)
    assert torch.equal(order.sort(1).values, torch.arange(3).expand(n, 3))  # every row a permutation
    rows = [tuple(r) for r in order.tolist()]
    total = 0.0
    for perm in itertools.permutations(range(3)):
        p = plackett_luce_probability(g, perm, T)
        total += p
        freq = rows.count(perm) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (perm, freq, p)
    assert total == pytest.approx(1.0)


def test_plackett_luce_with_two_answers_is_bradley_terry():
    gen = torch.Generator().manual_seed(1)
    n = 20_000
    for diff, T in ((0.0, 1.0), (1.0, 1.0), (-2.0, 1.0), (1.0, 0.5), (1.0, 3.0)):
        g2 = torch.randn(n, generator=gen)
        order = imdb.plackett_luce_ranking(torch.stack([g2 + diff, g2], 1), T, gen)
        first_wins = (order[:, 0] == 0).float().mean().item()
        p = 1 / (1 + math.exp(-diff / T))  # sigmoid((g1 - g2) / T)
        assert abs(first_wins - p) < 4 * math.sqrt(p * (1 - p) / n), (diff, T)


def test_plackett_luce_at_temperature_zero_is_the_judges_order():
    g = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    order = imdb.plackett_luce_ranking(g, 0.0, torch.Generator().manual_seed(3))
    want = [sorted(range(5), key=lambda k: -row[k]) for row in g.tolist()]  # best first
    assert order.tolist() == want
    assert torch.equal(imdb.plackett_luce_ranking(g, 0), order)  # no randomness drawn, no generator needed
    with pytest.raises(ValueError, match="temperature"):
        imdb.plackett_luce_ranking(g, -0.1)


def test_plackett_luce_draws_follow_the_generator():
    g = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))
    a = imdb.plackett_luce_ranking(g, 1.0, torch.Generator().manual_seed(5))
    b = imdb.plackett_luce_ranking(g, 1.0, torch.Generator().manual_seed(5))
    c = imdb.plackett_luce_ranking(g, 1.0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- the judge
POS, NEG = ["great", "wonderful"], ["awful", "boring"]
FILLER = "the movie film plot actor scene story was is and a it this of with".split()


def synthetic(n, seed):
    """n reviews of 12 filler words plus one or two class words; the class alone sets the label."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(12)]
        for w in rng.sample(POS if label else NEG, rng.choice([1, 2])):
            words.insert(rng.randrange(len(words) + 1), w)
        texts.append(" ".join(words).capitalize() + ".")
        labels.append(label)
    return texts, labels


def test_judge_separates_synthetic_reviews():
    texts, labels = synthetic(200, seed=0)
    held_out, held_labels = synthetic(100, seed=1)
    judge = judge_mod.GoldJudge.fit(texts, labels, min_df=2, l2=1e-3)
    assert judge.accuracy(held_out, held_labels) == 1.0
    g = judge.log_odds(held_out)
    assert g.dtype == torch.float32 and g.shape == (100,)
    assert torch.allclose(judge.prob_positive(held_out), torch.sigmoid(g))
    pos, neg = judge.top_ngrams(4)
    assert {"great", "wonderful"} <= {w for w, c in pos if c > 0}
    assert {"awful", "boring"} <= {w for w, c in neg if c < 0}
    # antisymmetry: the labels swapped give the log-odds negated
    swapped = judge_mod.GoldJudge.fit(texts, [1 - y for y in labels], min_df=2, l2=1e-3)
    assert torch.allclose(g, -swapped.log_odds(held_out), atol=1e-4)
    # deterministic: a second fit gives the same judge, bit for bit
    assert torch.equal(g, judge_mod.GoldJudge.fit(texts, labels, min_df=2, l2=1e-3).log_odds(held_out))


def test_judge_words_keep_negations():
    assert judge_mod.words("It DIDN'T work!\nIsn't it?") == ["it", "didn't", "work", "!", "isn't", "it", "?"]


def test_judge_save_load_and_cache(root, tmp_path, monkeypatch):
    texts, _ = synthetic(20, seed=2)
    texts += ["an unseen word: zyzzyva", ""]
    cache = tmp_path / "cache"
    first = judge_mod.load_judge(root, cache_dir=cache, verbose=False, min_df=1)
    assert len(list(cache.glob("judge_*.pt"))) == 1
    assert first.info["n_train"] == 4 and first.info["n_test"] == 2

    def no_reading(path):
        raise AssertionError("read the archive instead of the cache")
    monkeypatch.setattr(judge_mod, "read_reviews", no_reading)
    second = judge_mod.load_judge(root, cache_dir=cache, verbose=False, min_df=1)
    assert torch.equal(first.log_odds(texts), second.log_odds(texts))  # exactly reproducible
    assert second.info == first.info and second.top_ngrams(3) == first.top_ngrams(3)
    with pytest.raises(UserError, match="unknown judge setting"):
        judge_mod.load_judge(root, cache_dir=cache, verbose=False, mindf=1)
    with pytest.raises(UserError, match="l2 > 0"):
        judge_mod.load_judge(root, cache_dir=cache, verbose=False, l2=0.0)
    monkeypatch.undo()
    path, = cache.glob("judge_*.pt")
    path.write_bytes(b"damaged")
    with pytest.raises(UserError, match="cannot load the gold judge"):
        judge_mod.GoldJudge.load(path)
    third = judge_mod.load_judge(root, cache_dir=cache, verbose=False, min_df=1)  # fitted again
    assert torch.equal(first.log_odds(texts), third.log_odds(texts))
    assert torch.equal(first.log_odds(texts), judge_mod.GoldJudge.load(path).log_odds(texts))
