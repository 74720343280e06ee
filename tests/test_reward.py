"""reward.py against independent definitions: Bradley-Terry against -log(sigmoid()) in float64 and its
closed-form gradient, stability at +-1e4, the K-wise loss against pairs enumerated by itertools, the reward
read at each row's last real token, gradient accumulation (1 x 8 == 8 x 1 == 3 + 5), the length floor,
the missing checkpoint error and a tiny end-to-end run (accuracy rises, rewards normalised)."""
import itertools
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import common
import data
import reward
from common import setup_runtime
from common import UserError
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import GPT, GPTConfig

RT = setup_runtime(SimpleNamespace(device="cpu", dtype="float32", seed=0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, **kw))


def fixture_pairs(hh_dir, split="train", vocab_size=50257):
    return data.load_hh_rlhf(hh_dir, block_size=64, max_prompt_len=32, cache_dir=None, verbose=False,
                             vocab_size=vocab_size)[split]


def fixture_rankings(hh_dir, n):
    """n rankings of K = 3 responses of different lengths, best first: the fixture's chosen answer, its first 5
    tokens, its rejected answer."""
    return [dict(prompt=p["prompt"], responses=[p["chosen"], p["chosen"][:5], p["rejected"]])
            for p in fixture_pairs(hh_dir)[:n]]


def alone(model, prompt, response):
    """The reward of one sequence, no padding, no batch: the head at its last token."""
    return model.scalar(torch.tensor([prompt + response]))[0, -1]


# ----------------------------------------------------------------------------- the losses
def test_bt_loss_equals_minus_log_sigmoid_in_float64():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(50, generator=g) * 4, torch.randn(50, generator=g) * 4
    expected = -torch.log(torch.sigmoid(c.double() - r.double())).mean().item()
    assert reward.bt_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    assert reward.bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("diff", [1e4, -1e4])
def test_bt_loss_is_finite_for_huge_differences(diff):
    c = torch.tensor([diff], requires_grad=True)
    r = torch.tensor([0.0], requires_grad=True)
    loss = reward.bt_loss(c, r)
    loss.backward()
    # -log sigmoid(d) = log(1 + e^-d): 0 for d = 1e4, d itself for d = -1e4 (e^-1e4 underflows)
    assert loss.item() == pytest.approx(max(0.0, -diff), abs=1e-3)
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert c.grad.item() == pytest.approx(-1.0 if diff < 0 else 0.0, abs=1e-6)  # -sigmoid(-d)


def test_bt_gradient_raises_chosen_and_lowers_rejected():
    g = torch.Generator().manual_seed(1)
    c = (torch.randn(8, generator=g)).requires_grad_(True)
    r = (torch.randn(8, generator=g)).requires_grad_(True)
    reward.bt_loss(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # gradient descent raises r_w and lowers r_l
    expected = -torch.sigmoid(-(c.detach() - r.detach())) / 8  # d/dr_w of -mean log sigmoid(r_w - r_l)
    torch.testing.assert_close(c.grad, expected)
    torch.testing.assert_close(r.grad, -expected)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_ranking_loss_is_the_mean_over_enumerated_pairs(K):
    g = torch.Generator().manual_seed(K)
    P = 5
    rewards = torch.randn(P, K, generator=g, dtype=torch.float64) * 2  # ordered best first
    losses = [reward.bt_loss(rewards[p, i:i + 1], rewards[p, j:j + 1])
              for p in range(P) for i, j in itertools.combinations(range(K), 2)]
    assert len(losses) == P * math.comb(K, 2)
    assert reward.ranking_loss(rewards).item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-12)
    if K == 2:
        pairwise = reward.bt_loss(rewards[:, 0], rewards[:, 1])
        assert reward.ranking_loss(rewards).item() == pytest.approx(pairwise.item())


def test_ranking_loss_rejects_a_single_response():
    with pytest.raises(ValueError, match="K >= 2"):
        reward.ranking_loss(torch.zeros(3, 1))


def test_longer_wins_floor_by_hand():
    ex = [dict(chosen=[1, 2, 3], rejected=[1]), dict(chosen=[1], rejected=[1, 2]),
          dict(chosen=[1, 2], rejected=[3, 4])]  # longer wins, shorter wins, a tie
    assert reward.longer_wins(ex) == pytest.approx((1 + 0 + 0.5) / 3)


def test_ranking_metrics_by_hand():
    """The reward model's test figures of scored pairs: accuracy (a tie 1/2), mean margin, mean bt_loss."""
    c, r = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])  # right, wrong, a tie
    m = reward.ranking_metrics(c, r)
    assert m["accuracy"] == pytest.approx(1.5 / 3) and m["margin"] == pytest.approx(0.0)
    assert m["loss"] == pytest.approx(sum(math.log(1 + math.exp(-d)) for d in (1.0, -1.0, 0.0)) / 3)


# ----------------------------------------------------------------------------- the model side
def test_ranking_rewards_map_row_i_k_to_prompt_i_answer_k(hh_dir):
    rankings = fixture_rankings(hh_dir, 4)
    model = tiny_gpt(scalar_head=True).eval()
    rewards = reward.ranking_rewards(model.score, data.collate_rankings(rankings, pad_id=999), 3)
    assert rewards.shape == (4, 3)
    for i, r in enumerate(rankings):
        for k, resp in enumerate(r["responses"]):
            assert rewards[i, k].item() == pytest.approx(alone(model, r["prompt"], resp).item(), abs=1e-5), (i, k)


def test_score_rankings_and_pair_scores_against_each_answer_alone(hh_dir):
    """score_rankings with a batch size that cuts rankings apart (5 rows, K = 3), and pair_scores' pairs in
    ranking_pairs order, each with the rewards of its two answers."""
    rankings = fixture_rankings(hh_dir, 4)
    model = tiny_gpt(scalar_head=True).eval()
    scores = reward.score_rankings(model, rankings, RT, batch_size=5)
    with torch.no_grad():
        want = [[alone(model, r["prompt"], y).item() for y in r["responses"]] for r in rankings]
    assert len(scores) == 4 and all(len(s) == 3 for s in scores)
    for s, w in zip(scores, want):
        assert s == pytest.approx(w, abs=1e-5)
    pairs, c, r = reward.pair_scores(rankings, scores)
    assert len(pairs) == len(c) == len(r) == 4 * 3
    n = 0
    for q, ranking in enumerate(rankings):
        for i, j in itertools.combinations(range(3), 2):
            p = pairs[n]
            assert p["chosen"] == ranking["responses"][i] and p["rejected"] == ranking["responses"][j]
            assert (c[n].item(), r[n].item()) == pytest.approx((want[q][i], want[q][j]), abs=1e-5)
            n += 1


def test_gold_agreement_by_hand():
    pairs = [dict(gold_chosen=g1, gold_rejected=g2) for g1, g2 in
             [(2.0, 0.0), (0.0, 0.5), (1.0, -1.0), (0.3, 0.1), (-2.0, 1.0)]]
    chosen = torch.tensor([1.0, 1.0, -1.0, 0.5, 0.0])  # the reward model's scores of each pair's two answers
    rejected = torch.tensor([0.0, 2.0, 1.0, 0.5, 3.0])
    m = reward.gold_agreement(pairs, chosen, rejected)
    # the judge prefers: chosen, rejected, chosen, chosen, rejected; the reward model agrees on pairs 0, 1, 4,
    # disagrees on 2, ties on 3 (1/2)
    assert m["gold_accuracy"] == pytest.approx((1 + 1 + 0 + 0.5 + 1) / 5)
    assert m["label_ceiling"] == pytest.approx(3 / 5)  # the label (chosen) is the judge's pick on 0, 2, 3
    # separated by >= 1 log-odds: pairs 0 (2.0), 2 (2.0), 4 (3.0)
    assert m["n_clear"] == 3 and m["gold_accuracy_clear"] == pytest.approx((1 + 0 + 1) / 3)
    close = reward.gold_agreement(pairs[3:4], chosen[3:4], rejected[3:4])
    assert close["n_clear"] == 0 and math.isnan(close["gold_accuracy_clear"])


def test_gradient_accumulation_one_by_eight_equals_eight_by_one(hh_dir):
    """The step's loss is one mean over its prompts: 1 x 8, 8 x 1 and 3 + 5 rankings of K = 3 give the same
    gradient (a plain mean of the micro-batch means would weight 3 + 5 wrongly), and that loss is the mean over
    every prompt's C(3, 2) = 3 pairs of -log sigmoid(r_i - r_j), each answer scored alone."""
    rankings = fixture_rankings(hh_dir, 8)
    model = tiny_gpt(scalar_head=True)

    def grads(micro):
        model.zero_grad()
        loss, acc = reward.accumulate_ranking_gradients(model.score, micro, RT, 3)
        return loss, acc, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    l1, a1, g1 = grads([data.collate_rankings(rankings)])
    l8, a8, g8 = grads([data.collate_rankings([r]) for r in rankings])
    l35, a35, g35 = grads([data.collate_rankings(rankings[:3]), data.collate_rankings(rankings[3:])])
    assert l1 == pytest.approx(l8, rel=1e-5) == pytest.approx(l35, rel=1e-5)
    assert a1 == pytest.approx(a8) == pytest.approx(a35)
    assert g1.keys() == g8.keys() == g35.keys() and "scalar_head.weight" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g8[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g1[k], g35[k], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        r = [[alone(model, x["prompt"], y).double() for y in x["responses"]] for x in rankings]
    terms = [-torch.log(torch.sigmoid(q[i] - q[j])).item() for q in r for i, j in itertools.combinations(range(3), 2)]
    assert l1 == pytest.approx(sum(terms) / len(terms), rel=1e-5)  # independent definition
    wins = [float(q[i] > q[j]) for q in r for i, j in itertools.combinations(range(3), 2)]
    assert a1 == pytest.approx(sum(wins) / len(wins))


# ----------------------------------------------------------------------------- end to end
TINY = dict(task="hh", device="cpu", block_size=64, max_prompt_len=32, max_iters=30, batch_size=8, lr=3e-3,
            eval_every=10, eval_batch_size=16, norm_examples=0, n_show=2)


def args(**over):
    return [f"--{k}={v}" for k, v in {**TINY, **over}.items()]


def test_missing_sft_checkpoint_says_what_to_run(tmp_path, hh_dir):
    with pytest.raises(UserError, match=r"sft\.pt.*python sft\.py"):
        reward.main(args(out_dir=str(tmp_path), data_dir=hh_dir))


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path, hh_dir, monkeypatch, capsys):
    """The fixture's chosen responses are long and polite, the rejected ones "No.": the test loss must fall and the
    margin rise, to an accuracy above 0.9 (a random head may already order them all: then it must stay at 1)."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    sft = tiny_gpt(n_tokens=8192, padded_vocab_size=8192)  # the default vocabulary, common.SHARED's vocab_size
    save_checkpoint(os.path.join(out, "sft.pt"), sft, dict(block_size=64, max_prompt_len=32), "sft")
    report = reward.main(args(out_dir=out, data_dir=hh_dir))
    assert report["train_loss_last"] < report["train_loss_first"]
    assert report["accuracy_after"] > 0.9 and report["accuracy_after"] >= report["accuracy_before"]
    assert report["margin_after"] > report["margin_before"] and report["loss_after"] < report["loss_before"]
    assert report["longer_wins"] == 1.0  # every chosen response is longer than "No."
    text = capsys.readouterr().out
    assert "longer response wins" in text and "chosen" in text and "rejected" in text
    rows = [json.loads(line) for line in open(os.path.join(out, "rm_log.jsonl"))]
    assert sum("loss" in r for r in rows) == 30
    assert [r["step"] for r in rows if "test_accuracy" in r] == [0, 10, 20, 30]
    assert os.path.getsize(os.path.join(out, "rm.png")) > 0
    # normalisation: the mean reward of the train chosen responses is 0, each scored alone and unpadded
    ckpt = load_checkpoint(os.path.join(out, "rm.pt"))
    rm = model_from_checkpoint(ckpt).eval()
    train = fixture_pairs(hh_dir, vocab_size=8192)
    with torch.no_grad():
        rewards = [rm.scalar(torch.tensor([p["prompt"] + p["chosen"]]))[0, -1].item() for p in train]
    assert sum(rewards) / len(rewards) == pytest.approx(0.0, abs=1e-4)
    assert ckpt["reward_bias"] == pytest.approx(report["reward_bias"]) and ckpt["reward_bias"] != 0


def test_a_biased_or_smaller_reward_model_never_overwrites_the_default_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag in ("--label_bias_weight=1", "--train_rankings=300"):
        with pytest.raises(common.ConfigError, match="folder of its own"):
            reward.main(["--device=cpu", flag])  # out_dir defaults to out/imdb: refused before anything is read


def test_the_training_accuracy_counts_a_tie_as_one_half_like_the_test_accuracy(hh_dir):
    rankings = fixture_rankings(hh_dir, 4)
    rt = RT
    weight = torch.nn.Parameter(torch.zeros(()))
    constant = lambda idx, mask: weight + torch.zeros(idx.shape[0])  # every answer the same reward: all ties
    loss, acc = reward.accumulate_ranking_gradients(constant, [data.collate_rankings(rankings)], rt, 3)
    assert acc == 0.5 and loss == pytest.approx(math.log(2))


def test_a_damaged_comparisons_file_is_sampled_again_saying_so(tmp_path, capsys):
    (tmp_path / "comparisons.pt").write_bytes(b"not a torch file")
    cfg = SimpleNamespace(out_dir=str(tmp_path))
    assert reward.same_comparisons(cfg, dict(n_prompts=3)) is False
    assert "damaged" in capsys.readouterr().out


@pytest.mark.slow
def test_the_before_figures_of_a_resumed_run_are_those_of_the_start(tmp_path, hh_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    save_checkpoint(os.path.join(out, "sft.pt"), tiny_gpt(n_tokens=8192, padded_vocab_size=8192),
                    dict(block_size=64, max_prompt_len=32), "sft")
    first = reward.main(args(out_dir=out, data_dir=hh_dir, max_iters=6, eval_every=0, n_show=0))
    again = reward.main(args(out_dir=out, data_dir=hh_dir, max_iters=9, eval_every=0, n_show=0, resume=True))
    for k in ("accuracy", "margin", "loss"):
        assert again[f"{k}_before"] == pytest.approx(first[f"{k}_before"], abs=1e-6), k  # the fresh head's
    assert again["loss_after"] != pytest.approx(again["loss_before"])
