"""Tests of data/hh_rlhf.py on small hand-written HH-style files (no network).
Expected values are written by hand or computed by brute force, never captured from the loader."""
import gzip
import json
import os
import urllib.error
import urllib.request

import pytest
import tiktoken
import torch

import data
from common import UserError
from data import hh_rlhf

ENC = tiktoken.get_encoding("gpt2")
EOT = 50256


def write_jsonl(path, rows):
    """rows: dicts (written as JSON) or raw strings (written as they are), one per line, gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def pair(prompt, chosen, rejected):
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


MULTI = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:"
LOCK = "\n\nHuman: How do I pick a lock?\n\nAssistant:"


@pytest.fixture
def quirks_dir(tmp_path):
    """Two subsets with test files only: 3 usable pairs and 4 quirks."""
    d = tmp_path / "hh"
    write_jsonl(d / "helpful-base/test.jsonl.gz", [
        pair(MULTI, " It is 4.", " It is 5."),                                   # multi-turn, kept
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: x"},  # prompts differ
        pair("\n\nHuman: C\n\nAssistant:", " ok", "  \n "),                     # empty (whitespace) response
        pair("\n\nHuman: D\n\nAssistant:", " same", " same"),                   # identical responses
    ])
    write_jsonl(d / "harmless-base/test.jsonl.gz", [
        pair(LOCK, " I can't help with that.", " Use a pin."),                  # kept
        pair("\n\nHuman: E\n\nAssistant:", "", " fine"),                        # empty chosen response
        pair("\n\nHuman: F\n\nAssistant:", " As an Assistant: no.", " Sure."),  # 'Assistant:' inside a response
    ])
    return d


def test_split_dialogue():
    assert data.split_dialogue(MULTI + " It is 4.") == (MULTI, " It is 4.")
    assert data.split_dialogue("\n\nHuman: q\n\nAssistant:") == ("\n\nHuman: q\n\nAssistant:", "")
    with pytest.raises(ValueError, match="Assistant"):
        data.split_dialogue("\n\nHuman: no answer")


def test_read_pairs_split_and_skips(quirks_dir):
    splits, summary = data.read_pairs(quirks_dir, test_fraction=0.0, verbose=False)  # everything -> train
    assert splits["test"] == []
    assert sorted(splits["train"], key=str) == sorted([  # the order is a fixed shuffle, see read_pairs
        dict(prompt=MULTI, chosen=" It is 4.", rejected=" It is 5."),
        dict(prompt=LOCK, chosen=" I can't help with that.", rejected=" Use a pin."),
        dict(prompt="\n\nHuman: F\n\nAssistant:", chosen=" As an Assistant: no.", rejected=" Sure."),
    ], key=str)
    assert summary["files"] == {"helpful-base/test.jsonl.gz": 4, "harmless-base/test.jsonl.gz": 3}
    assert summary["skipped"] == {"prompt_mismatch": 1, "empty_response": 2, "identical": 1}
    assert summary["skipped_per_file"]["harmless-base/test.jsonl.gz"] == \
        {"prompt_mismatch": 0, "empty_response": 1, "identical": 0}
    assert summary["sizes"] == {"train": 3, "test": 0}


@pytest.mark.parametrize("bad, what", [
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": ', "malformed JSON"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}', "'rejected'"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": 3}', "'rejected'"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"chosen": "\\n\\nHuman: a", "rejected": "\\n\\nHuman: a\\n\\nAssistant: b"}', "Assistant"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
    good = json.dumps(pair(LOCK, " a", " b"))
    path = tmp_path / "helpful-base/test.jsonl.gz"
    write_jsonl(path, [good, good, bad, good])
    write_jsonl(tmp_path / "harmless-base/test.jsonl.gz", [good])
    with pytest.raises(UserError) as e:
        data.read_pairs(tmp_path, verbose=False)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and what in msg


@pytest.mark.parametrize("cut", [True, False])
def test_corrupt_gzip_names_file(tmp_path, cut):
    path = tmp_path / "helpful-base/test.jsonl.gz"
    write_jsonl(path, [pair(LOCK, f" a{i}", " b") for i in range(200)])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if cut else b"not gzip at all")  # truncated / not gzip
    write_jsonl(tmp_path / "harmless-base/test.jsonl.gz", [])
    with pytest.raises(UserError, match=str(path)):
        data.read_pairs(tmp_path, verbose=False)


def test_plain_jsonl_is_read(tmp_path):
    for s in data.SUBSETS:
        (tmp_path / s).mkdir()
        (tmp_path / s / "test.jsonl").write_text(json.dumps(pair(LOCK, " a", " b")) + "\n")
    splits, _ = data.read_pairs(tmp_path, test_fraction=0.0, verbose=False)
    assert splits["train"] == [dict(prompt=LOCK, chosen=" a", rejected=" b")] * 2


def test_missing_data_and_failed_download(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="test.jsonl.gz"):
        data.read_pairs(tmp_path / "nowhere", verbose=False)
    monkeypatch.delenv("RLHF_DATA_DIR", raising=False)
    monkeypatch.setattr(hh_rlhf, "DEFAULT_DATA_DIR", tmp_path / "download")

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        data.read_pairs(None, verbose=False)
    assert "RLHF_DATA_DIR" in str(e.value) and "--data_dir" in str(e.value)
    assert not any(p.is_file() for p in (tmp_path / "download").rglob("*"))  # no half-written file left


def test_truncation_keeps_prompt_end_and_response_start(tmp_path):
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(40)) + "\n\nAssistant:"
    long_resp = " " + " ".join(f"reply{i}" for i in range(40))
    short_prompt, short_resp = "\n\nHuman: Hi\n\nAssistant:", " Hello."
    write_jsonl(tmp_path / "helpful-base/test.jsonl.gz",
                [pair(long_prompt, long_resp, short_resp), pair(short_prompt, short_resp, long_resp)])
    write_jsonl(tmp_path / "harmless-base/test.jsonl.gz", [])
    d, summary = data.load_hh_rlhf(tmp_path, block_size=32, max_prompt_len=20, cache_dir=None,
                                   verbose=False, test_fraction=0.0, return_summary=True)
    first, second = d["train"]
    assert first["prompt"] == ENC.encode(long_prompt)[-20:]                 # the END of the prompt
    assert first["chosen"] == ENC.encode(long_resp)[:12]                    # the START, EOT cut off
    assert first["rejected"] == ENC.encode(short_resp) + [EOT]              # fits: EOT kept
    assert second["prompt"] == ENC.encode(short_prompt)
    room = 32 - len(second["prompt"])
    assert second["rejected"] == (ENC.encode(long_resp) + [EOT])[:room]
    assert all(len(e["prompt"]) + len(e[k]) <= 32 for e in d["train"] for k in ("chosen", "rejected"))
    assert summary["skipped"]["prompt_too_long"] == 0
    # max_prompt_len 28 leaves 32 - 28 = 4 < 8 tokens of room for the long prompt only
    d, summary = data.load_hh_rlhf(tmp_path, block_size=32, max_prompt_len=28, cache_dir=None,
                                   verbose=False, test_fraction=0.0, return_summary=True)
    assert [e["prompt"] for e in d["train"]] == [ENC.encode(short_prompt)]
    assert summary["skipped"]["prompt_too_long"] == 1


def many_pairs_dir(root, split_names=("test",)):
    """100 prompts x 2 pairs each (same prompt twice) per subset and split."""
    for s in data.SUBSETS:
        for split in split_names:
            write_jsonl(root / s / f"{split}.jsonl.gz", [
                pair(f"\n\nHuman: {s} {split} question {i}\n\nAssistant:", f" good {i}.{j}", f" bad {i}.{j}")
                for i in range(100) for j in range(2)])
    return root


def test_hash_split_is_deterministic_and_prompt_disjoint(tmp_path):
    root = many_pairs_dir(tmp_path)
    a, _ = data.read_pairs(root, test_fraction=0.3, verbose=False)
    b, _ = data.read_pairs(root, test_fraction=0.3, verbose=False)
    assert a == b
    train, test = ({e["prompt"] for e in a[k]} for k in ("train", "test"))
    assert not train & test
    assert len(train | test) == 200 and len(a["train"]) + len(a["test"]) == 400
    assert 0.15 < len(test) / 200 < 0.45  # about test_fraction of the prompts


def test_published_split_is_used(tmp_path, capsys):
    root = many_pairs_dir(tmp_path, ("train", "test"))
    splits, summary = data.read_pairs(root, verbose=True)
    for split in ("train", "test"):
        assert {e["prompt"] for e in splits[split]} == \
            {f"\n\nHuman: {s} {split} question {i}\n\nAssistant:" for s in data.SUBSETS for i in range(100)}
        assert len(splits[split]) == 400
    assert "sha1" not in capsys.readouterr().out  # no home-made split announced


def test_cache_roundtrip_and_key(quirks_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kw = dict(block_size=64, max_prompt_len=32, cache_dir=cache, verbose=False, test_fraction=0.5)
    first = data.load_hh_rlhf(quirks_dir, **kw)
    assert len(list(cache.glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("the parser ran on a cache hit")
    with monkeypatch.context() as m:
        m.setattr(hh_rlhf, "read_pairs", boom)
        m.setattr(hh_rlhf, "tokenize_pairs", boom)
        second = data.load_hh_rlhf(quirks_dir, **kw)
    assert second == first and sum(map(len, first.values())) == 3
    data.load_hh_rlhf(quirks_dir, **{**kw, "block_size": 65})  # another setting -> another cache file
    assert len(list(cache.glob("*.json"))) == 2
    _, files = hh_rlhf.find_files(quirks_dir)
    keys = {hh_rlhf._cache_key(files, *args) for args in [
        (64, 32, 0.5, data.SUBSETS, 8), (64, 31, 0.5, data.SUBSETS, 8), (64, 32, 0.1, data.SUBSETS, 8),
        (64, 32, 0.5, data.SUBSETS[::-1], 8), (64, 32, 0.5, data.SUBSETS, 4), (64, 32, 0.5, data.SUBSETS, 8, 8192)]}
    assert len(keys) == 6
    src = quirks_dir / "helpful-base/test.jsonl.gz"  # a changed source file changes the key too
    before = hh_rlhf._cache_key(files, 64, 32, 0.5, data.SUBSETS, 8)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert hh_rlhf._cache_key(files, 64, 32, 0.5, data.SUBSETS, 8) != before


EXAMPLES = [  # hand-made token examples of different lengths
    dict(prompt=[5, 6, 7], chosen=[8, 9, EOT], rejected=[10, EOT]),
    dict(prompt=[11], chosen=[12, EOT], rejected=[13, 14, 15, 16, EOT]),
    dict(prompt=[17, 18, 19, 20, 21], chosen=[22], rejected=[23, 24]),
]
PAD = 777


def check_rows(idx, attention_mask, target_mask, prompts, responses):
    """Brute force, per row: right padding, the real tokens and the target tokens via the masks."""
    assert idx.dtype == torch.long and attention_mask.dtype == target_mask.dtype == torch.float32
    assert idx.shape == (len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses)))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        assert attention_mask[i].tolist() == [1.0] * n + [0.0] * (idx.shape[1] - n)  # right-padded
        assert idx[i, n:].tolist() == [PAD] * (idx.shape[1] - n)
        assert [t for t, m in zip(idx[i].tolist(), attention_mask[i].tolist()) if m] == p + r
        assert [t for t, m in zip(idx[i].tolist(), target_mask[i].tolist()) if m] == r
        assert target_mask[i, :len(p)].sum() == 0 and target_mask[i, 0] == 0


def test_collate_sft():
    b = data.collate_sft(EXAMPLES, pad_id=PAD)
    check_rows(b["idx"], b["attention_mask"], b["target_mask"],
               [e["prompt"] for e in EXAMPLES], [e["chosen"] for e in EXAMPLES])


def test_collate_pairs():
    b = data.collate_pairs(EXAMPLES, pad_id=PAD)
    assert b["idx"].shape[0] == 2 * len(EXAMPLES)
    check_rows(b["idx"], b["attention_mask"], b["target_mask"], [e["prompt"] for e in EXAMPLES] * 2,
               [e["chosen"] for e in EXAMPLES] + [e["rejected"] for e in EXAMPLES])


def test_collate_prompts_left_padded():
    b = data.collate_prompts(EXAMPLES, pad_id=PAD)
    assert b["idx"].shape == (3, 5) and b["idx"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.float32
    assert b["idx"].tolist() == [[PAD, PAD, 5, 6, 7], [PAD, PAD, PAD, PAD, 11], [17, 18, 19, 20, 21]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]


def test_pretraining_tokens_are_the_chosen_dialogues_only():
    stream = data.pretraining_tokens(EXAMPLES)
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == [5, 6, 7, 8, 9, EOT,
                               11, 12, EOT,
                               17, 18, 19, 20, 21, 22, EOT]  # a cut response gets its EOT back; no rejected answer


def test_no_rejected_token_reaches_the_pretraining_stream():
    """The stream is also PPO-ptx's text: hand-made examples whose rejected answers use ids found nowhere else
    (9000 and up) must leave none of them in it, with GPT-2's vocabulary and with a cut one (EOT = V - 1)."""
    for V in (50257, 8192):
        eot = V - 1
        examples = [dict(prompt=[5, 6], chosen=[7, eot], rejected=[9001, 9002, eot]),
                    dict(prompt=[8], chosen=[10, 11], rejected=[9003]),  # chosen cut before its EOT
                    dict(prompt=[12, 13, 14], chosen=[15, eot], rejected=[9004, 9005, 9006, eot])]
        stream = data.pretraining_tokens(examples, V).tolist()
        want = []
        for e in examples:  # prompt + chosen, one EOT after each
            doc = e["prompt"] + [t for t in e["chosen"] if t != eot]
            want += doc + [eot]
        assert stream == want, V
        assert not {9001, 9002, 9003, 9004, 9005, 9006} & set(stream)
        assert stream.count(eot) == len(examples)


def test_a_cut_vocabulary_tokenises_the_same_text(tmp_path):
    """load_hh_rlhf(vocab_size=V): every id below V, every response ends with V - 1 (its EOT), and the tokens
    decode to the very text GPT-2's tokens of the full vocabulary decode to."""
    cafe = "\n\nHuman: Café? 😀\n\nAssistant:"
    texts = [(MULTI, " It is 4.", " It is 5."), (LOCK, " I can't help with that, sorry.", " Use a pin."),
             (cafe, " Oui.", " No.")]
    write_jsonl(tmp_path / "helpful-base/test.jsonl.gz", [pair(*t) for t in texts[:2]])
    write_jsonl(tmp_path / "harmless-base/test.jsonl.gz", [pair(*texts[2])])
    kw = dict(block_size=256, max_prompt_len=128, cache_dir=tmp_path / "cache", verbose=False, test_fraction=0.0)
    full = data.load_hh_rlhf(tmp_path, **kw)["train"]
    cut = data.load_hh_rlhf(tmp_path, vocab_size=1024, **kw)["train"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # one cache file per vocabulary
    for examples, V in ((full, 50257), (cut, 1024)):
        assert sorted(tuple(data.decode(e[k], V) for k in ("prompt", "chosen", "rejected")) for e in examples) == \
            sorted(texts)
        for e in examples:
            assert all(0 <= t < V - 1 for t in e["prompt"])
            for k in ("chosen", "rejected"):
                assert e[k][-1] == V - 1 and all(0 <= t < V - 1 for t in e[k][:-1])
    assert sum(len(e["chosen"]) for e in cut) > sum(len(e["chosen"]) for e in full)  # fewer merges, more tokens
    again = data.load_hh_rlhf(tmp_path, vocab_size=1024, **kw)["train"]  # from the cache
    assert again == cut


# ----------------------------------------------------------------------------- rankings (data/tasks.py)
def test_ranking_pairs_all_and_best_worst():
    r = dict(prompt=[1, 2], responses=[[10], [11], [12], [13]], gold=[2.0, 1.5, -0.5, -1.0])  # K = 4, best first
    pairs = data.ranking_pairs([r])
    assert [(p["chosen"][0] - 10, p["rejected"][0] - 10) for p in pairs] == \
        [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # C(4, 2) = 6, in this order
    for p in pairs:
        i, j = p["chosen"][0] - 10, p["rejected"][0] - 10
        assert p["prompt"] == [1, 2] and (p["gold_chosen"], p["gold_rejected"]) == (r["gold"][i], r["gold"][j])
    best_worst = data.ranking_pairs([r], "best_worst")
    assert best_worst == [dict(prompt=[1, 2], chosen=[10], rejected=[13], gold_chosen=2.0, gold_rejected=-1.0)]
    # several rankings, K = 3, no gold (hh): the pairs of each in turn, without gold fields
    rs = [dict(prompt=[p], responses=[[p, 0], [p, 1], [p, 2]]) for p in (7, 8)]
    got = [(p["prompt"][0], p["chosen"][1], p["rejected"][1]) for p in data.ranking_pairs(rs, "all")]
    assert got == [(q, i, j) for q in (7, 8) for i in range(3) for j in range(i + 1, 3)]
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in data.ranking_pairs(rs))
    assert [(p["chosen"][1], p["rejected"][1]) for p in data.ranking_pairs(rs, "best_worst")] == [(0, 2), (0, 2)]
    k2 = [dict(prompt=[1], responses=[[2], [3]])]  # K = 2: one pair either way
    assert data.ranking_pairs(k2, "all") == data.ranking_pairs(k2, "best_worst") == \
        [dict(prompt=[1], chosen=[2], rejected=[3])]
    with pytest.raises(ValueError, match="best_worst"):
        data.ranking_pairs(rs, "some")


def test_rankings_file_round_trip_and_errors(tmp_path):
    from types import SimpleNamespace
    cfg = SimpleNamespace(out_dir=str(tmp_path))
    task = SimpleNamespace(name="imdb", rankings_train=None, rankings_test=None)
    with pytest.raises(UserError, match="comparisons.pt not found.*python reward.py --task=imdb"):
        data.load_rankings(cfg, task)
    train = [dict(prompt=[1], responses=[[2], [3], [4]], gold=[1.0, 0.0, -1.0])]
    test = [dict(prompt=[5], responses=[[6], [7], [8]], gold=[0.5, 0.2, 0.1])]
    data.save_rankings(cfg, dict(train=train, test=test), dict(n_prompts=1))
    assert os.listdir(tmp_path) == ["comparisons.pt"]
    assert data.load_rankings(cfg, task) == (train, test)
    (tmp_path / "comparisons.pt").write_bytes(b"damaged")
    with pytest.raises(UserError, match="comparisons.pt is damaged"):
        data.load_rankings(cfg, task)
    hh = SimpleNamespace(name="hh", rankings_train=train, rankings_test=test)  # hh: its own, no file read
    assert data.load_rankings(SimpleNamespace(out_dir=str(tmp_path / "nowhere")), hh) == (train, test)


def test_the_hh_task_gives_each_pair_as_a_ranking_of_two(hh_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.chdir(tmp_path)  # the cache goes under tmp_path
    cfg = SimpleNamespace(task="hh", data_dir=hh_dir, block_size=64, max_prompt_len=32, vocab_size=8192)
    task = data.load_task(cfg, verbose=False)
    assert task.name == "hh" and task.vocab_size == 8192 and task.judge is None
    for pairs, rankings in ((task.sft_train, task.rankings_train), (task.sft_test, task.rankings_test)):
        assert len(rankings) == len(pairs) > 0
        assert rankings == [dict(prompt=p["prompt"], responses=[p["chosen"], p["rejected"]]) for p in pairs]
    assert data.ranking_pairs(task.rankings_train) == \
        [dict(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"]) for p in task.sft_train]
    text = task.text.tolist()
    assert max(text) == 8191 and text.count(8191) == len(task.sft_train)  # one chosen dialogue per example


def test_sample_text_batch_windows_are_slices():
    stream = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    b = data.sample_text_batch(stream, 8, 16, generator=torch.Generator().manual_seed(1))
    assert b["idx"].shape == b["attention_mask"].shape == b["target_mask"].shape == (8, 16)
    windows = [stream[s:s + 16].tolist() for s in range(300 - 16 + 1)]
    assert all(row in windows for row in b["idx"].tolist())
    assert b["attention_mask"].eq(1).all()
    assert b["target_mask"][:, 0].eq(0).all() and b["target_mask"][:, 1:].eq(1).all()
    again = data.sample_text_batch(stream, 8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["idx"], b["idx"])
    whole = data.sample_text_batch(stream[:16], 2, 16)  # exactly one window fits
    assert whole["idx"].tolist() == [stream[:16].tolist()] * 2
    with pytest.raises(UserError, match="block_size"):
        data.sample_text_batch(stream[:10], 2, 16)
