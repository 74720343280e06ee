"""The imdb task end to end on a tiny synthetic archive (tests/conftest.py): every stage with --task=imdb writes its
files, the pairs carry the judge's gold scores and Bradley-Terry labels, and every report has the gold score."""
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

SETTINGS = dict(task="imdb", device="cpu", block_size=64, max_new_tokens=8, eval_prompts=6, eval_batch_size=8)


def argv(**over):
    return [f"--{k}={v}" for k, v in {**SETTINGS, **over}.items()]


@pytest.mark.slow
def test_every_stage_runs_on_imdb(imdb_root, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # data/cache (tokens, judge) under tmp_path
    out = str(tmp_path / "out")
    common = dict(out_dir=out, data_dir=imdb_root)
    report = sft.main(argv(**common, n_layer=1, n_head=2, n_embd=32, pretrain_iters=6, pretrain_batch_size=4,
                           sft_iters=6, batch_size=4, eval_interval=0, eval_examples=8, n_answers=1))
    assert {"gold", "positive", "length", "eos_rate"} <= set(report["eval"])  # the judge's view of SFT

    report = reward.main(argv(**common, n_pairs=12, n_test_pairs=6, max_iters=4, batch_size=4, eval_interval=0,
                              norm_examples=4, n_show=1))
    blob = torch.load(os.path.join(out, "pairs.pt"), weights_only=False)
    assert len(blob["train"]) + blob["info"]["dropped_identical"]["train"] == 12
    assert 0 < len(blob["test"]) <= 6
    pair = blob["train"][0]
    assert {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"} <= set(pair)
    judge = data.load_judge(imdb_root, verbose=False)  # the cached judge: the gold scores are its log-odds
    gold = data.gold_scores(judge, [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
    assert gold.tolist() == pytest.approx([pair["gold_chosen"], pair["gold_rejected"]], abs=1e-5)
    assert 0 <= report["gold_accuracy"] <= 1 and 0 <= report["label_ceiling"] <= 1

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

    report = dpo.main(argv(**common, max_iters=2, batch_size=2, eval_interval=0, log_interval=1, eval_pairs=4))
    assert "gold" in report["dpo"] and report["dpo"]["gold"] == pytest.approx(
        json.load(open(os.path.join(out, "eval_dpo.json")))["gold"])

    evaluate.main(argv(**common))
    text = capsys.readouterr().out
    assert "win rate over sft under the gold judge" in text
    for f in ("sft.pt", "pairs.pt", "rm.pt", "ppo.pt", "dpo.pt", "eval_sft.json", "eval_ppo.json", "eval_dpo.json",
              "frontier.png", "sft.png", "rm.png", "ppo.png", "dpo.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
