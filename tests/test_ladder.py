"""ladder.py: the seed statistics against hand-computed cases, and a tiny ladder on the synthetic IMDb archive that
runs every chosen rung for every seed, counts a diverged run, draws its chart and reruns nothing the second time."""
import json
import os

import pytest
import torch

import common
import evaluate
import ladder
from conftest import tiny_imdb_stages
import ppo


def test_seed_interval_is_the_range_below_five_seeds_and_a_bootstrap_from_five():
    r = evaluate.seed_interval([1.0, 3.0, 2.0, float("nan")])  # the nan of a diverged run is dropped
    assert r == dict(mean=2.0, low=1.0, high=3.0, n=3, how="range")
    assert evaluate.seed_interval([])["mean"] is None
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 10.0]
    b = evaluate.seed_interval(values)
    assert b["how"] == "bootstrap" and b["mean"] == pytest.approx(20 / 6)
    # the bootstrap's means by a loop over the same draws: their 2.5% and 97.5% quantiles
    idx = torch.randint(6, (10000, 6), generator=torch.Generator().manual_seed(0))
    means = sorted(sum(values[i] for i in row) / 6 for row in idx.tolist())
    assert b["low"] == pytest.approx(means[int(0.025 * 9999)], abs=0.05)
    assert b["high"] == pytest.approx(means[int(0.975 * 9999)], abs=0.05)
    assert min(values) < b["low"] < b["mean"] < b["high"] < max(values)  # narrower than the range
    assert evaluate.seed_interval([2.0] * 5)[("low")] == 2.0 == evaluate.seed_interval([2.0] * 5)["high"]


def test_order_says_not_separable_where_intervals_overlap():
    iv = lambda lo, hi: dict(mean=(lo + hi) / 2, low=lo, high=hi)
    assert evaluate.order(iv(2, 3), iv(0, 1)) == 1 and evaluate.order(iv(0, 1), iv(2, 3)) == -1
    assert evaluate.order(iv(0, 2), iv(1, 3)) == 0 and evaluate.order(iv(0, 1), iv(1, 2)) == 0  # touching: overlap


def test_unknown_settings_and_tasks_are_one_line_errors(tmp_path):
    with pytest.raises(common.ConfigError, match="unknown ppo3; expected all or names among reinforce, baseline"):
        ladder.main(["--device=cpu", f"--out_dir={tmp_path}", "--settings=gae,ppo3"])
    with pytest.raises(common.ConfigError, match="--seeds=0: expected a value >= 1"):
        ladder.main(["--device=cpu", f"--out_dir={tmp_path}", "--seeds=0"])
    with pytest.raises(common.ConfigError, match="only imdb has"):
        ladder.main(["--device=cpu", f"--out_dir={tmp_path}", "--task=hh"])


@pytest.mark.slow
def test_a_tiny_ladder_runs_every_seed_draws_and_keeps_what_it_ran(imdb_root, tmp_path, monkeypatch, one_thread,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    argv = tiny_imdb_stages(imdb_root, out)
    real_main, calls = ppo.main, []

    def main(args):  # the klpen run of the second seed stops on a nan, as a diverged run would
        calls.append(args)
        if "--surrogate=klpen" in args and "--seed=1338" in args:
            raise common.Diverged("training diverged at step 1: policy_loss = nan")
        return real_main(args)
    monkeypatch.setattr(ppo, "main", main)
    flags = argv(settings="reinforce,klpen,gae,ptx", seeds=2, ppo_args="--iterations=2 --batch_size=4 "
                 "--minibatch_size=2 --ptx_batch_size=2 --ptx_block_size=16")
    rows = ladder.main(flags)
    assert [r["name"] for r in rows] == ["reinforce", "klpen", "gae", "ptx"] and len(calls) == 8
    reinforce = [a for a in calls if "--advantage_estimator=reinforce" in a][0]
    assert "--minibatch_size=4" in reinforce and "--ppo_epochs=1" in reinforce  # one step on the whole rollout
    stats = {r["name"]: r["stats"] for r in rows}
    assert stats["klpen"]["diverged"] == 1 and stats["klpen"]["gold"]["n"] == 1
    assert all(stats[n]["gold"]["n"] == 2 and stats[n]["diverged"] == 0 for n in ("reinforce", "gae", "ptx"))
    for name in ("reinforce", "gae"):  # the interval is the range over the two seeds' final gold
        golds = [json.load(open(os.path.join(out, "ladder", f"{name}_seed{s}", "eval_ppo.json")))["gold"]
                 for s in (1337, 1338)]
        assert (stats[name]["gold"]["low"], stats[name]["gold"]["high"]) == (min(golds), max(golds))
    text = capsys.readouterr().out
    assert "| 1 REINFORCE: A = R |" in text and "run 8 of 8: ptx seed 1338" in text
    assert os.path.getsize(os.path.join(out, "ladder", "ladder.png")) > 1000
    assert os.path.realpath(os.path.join(out, "ladder", "gae_seed1337", "rm.pt")) == os.path.realpath(
        os.path.join(out, "rm.pt"))  # shared, not re-trained
    calls.clear()
    again = ladder.main(flags)  # everything is there: nothing runs again, the same figures
    assert calls == [] and [r["stats"] for r in again] == [r["stats"] for r in rows]
