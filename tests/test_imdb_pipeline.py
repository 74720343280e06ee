"""The imdb task end to end on a tiny synthetic archive (tests/conftest.py): every stage with --task=imdb writes its
files, the comparisons are K answers per prompt ranked by the judge (with their gold scores), and every report has the
gold score. It runs on the default cut vocabulary (common.SHARED's vocab_size, 8192 tokens)."""
import json
import os
import shutil

import pytest
import torch

import data
import dpo
import evaluate
import ppo
import reward
import sft
from checkpoint import load_checkpoint, model_from_checkpoint

SETTINGS = dict(task="imdb", device="cpu", block_size=64, max_new_tokens=8, eval_prompts=6, eval_batch_size=8)


def argv(**over):
    return [f"--{k}={v}" for k, v in {**SETTINGS, **over}.items()]


@pytest.mark.slow
def test_every_stage_runs_on_imdb(imdb_root, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # data/cache (tokens, judge) under tmp_path
    out = str(tmp_path / "out")
    common = dict(out_dir=out, data_dir=imdb_root)
    report = sft.main(argv(**common, n_layer=1, n_head=2, n_embd=32, pretrain_iters=6, pretrain_batch_size=4,
                           sft_iters=6, batch_size=4, eval_every=0, eval_examples=8, n_answers=1))
    assert {"gold", "positive", "length", "eos_rate"} <= set(report["eval"])  # the judge's view of SFT

    report = reward.main(argv(**common, n_prompts=12, n_test_prompts=6, answers_per_prompt=3, max_iters=4,
                              batch_size=4, eval_every=0, norm_examples=4, n_show=1))
    blob = torch.load(os.path.join(out, "comparisons.pt"), weights_only=False)
    assert not os.path.exists(os.path.join(out, "pairs.pt"))
    assert len(blob["train"]) + blob["info"]["dropped_identical"]["train"] == 12
    assert 0 < len(blob["test"]) <= 6 and blob["info"]["answers_per_prompt"] == 3
    assert blob["info"]["vocab_size"] == 8192
    judge = data.load_judge(imdb_root, verbose=False)  # the cached judge: the gold scores are its log-odds
    for ranking in blob["train"] + blob["test"]:
        assert set(ranking) == {"prompt", "responses", "gold"} and len(ranking["responses"]) == 3
        assert len({tuple(y) for y in ranking["responses"]}) == 3  # rankings with two identical answers dropped
        assert all(0 <= t < 8192 for y in ranking["responses"] for t in ranking["prompt"] + y)
        gold = data.gold_scores(judge, [ranking["prompt"]] * 3, ranking["responses"], 8192)
        assert gold.tolist() == pytest.approx(ranking["gold"], abs=1e-5)
    # the agreement with the judge, recomputed pair by pair: each answer scored alone by rm.pt, the judge's order
    rm = model_from_checkpoint(load_checkpoint(os.path.join(out, "rm.pt")), scalar_head=True).eval()
    agree, ceiling = [], []
    for ranking in blob["test"]:
        with torch.no_grad():
            batches = [data.collate_sft([dict(prompt=ranking["prompt"], chosen=y)]) for y in ranking["responses"]]
            r = [rm.score(b["idx"], b["attention_mask"]).item() for b in batches]
        g = ranking["gold"]
        for i in range(3):
            for j in range(i + 1, 3):
                hi, lo = (i, j) if g[i] > g[j] else (j, i)  # the judge's preferred answer first
                agree.append(1.0 if r[hi] > r[lo] else 0.5 if r[hi] == r[lo] else 0.0)
                ceiling.append(1.0 if g[i] > g[j] else 0.5 if g[i] == g[j] else 0.0)  # the label says i beats j
    assert report["gold_accuracy_after"] == pytest.approx(sum(agree) / len(agree), abs=1e-6)
    assert report["label_ceiling_after"] == pytest.approx(sum(ceiling) / len(ceiling), abs=1e-6)
    assert report["n_clear_after"] <= 3 * len(blob["test"])  # C(3, 2) = 3 test pairs per prompt

    report = ppo.main(argv(**common, iterations=2, batch_size=4, minibatch_size=2, ptx_batch_size=2,
                           ptx_block_size=16, sample_every=1))
    rows = [json.loads(line) for line in open(os.path.join(out, "ppo_log.jsonl"))]
    assert len(rows) == 2 and all("gold" in r and "score" in r for r in rows)
    assert {"gold", "positive", "score", "kl"} <= set(report["ppo"]) and "gold_win_rate" in report

    os.makedirs(os.path.join(out, "gold"))
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(out, name), os.path.join(out, "gold", name))
    ppo.main(argv(task="imdb", data_dir=imdb_root, out_dir=os.path.join(out, "gold"), iterations=1, batch_size=4,
                  minibatch_size=2, ptx_coef=0, reward="gold"))  # PPO against the judge itself: its score IS the gold score
    row = json.loads(open(os.path.join(out, "gold", "ppo_log.jsonl")).readline())
    assert row["score"] == pytest.approx(row["gold"], abs=1e-5)

    report = dpo.main(argv(**common, max_iters=2, batch_size=2, eval_every=0, log_every=1, eval_pairs=4,
                           pairs_of_ranking="best_worst"))
    assert "gold" in report["dpo"] and report["dpo"]["gold"] == pytest.approx(
        json.load(open(os.path.join(out, "eval_dpo.json")))["gold"])

    evaluate.main(argv(**common))
    text = capsys.readouterr().out
    assert "win rate over sft under the gold judge" in text
    for f in ("sft.pt", "comparisons.pt", "rm.pt", "ppo.pt", "dpo.pt", "eval_sft.json", "eval_ppo.json", "eval_dpo.json",
              "frontier.png", "sft.png", "rm.png", "ppo.png", "dpo.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
