"""model.py against independent definitions: causality, padding invariance, KV cache vs full forward,
EOS handling, the scalar head's read-out, per-token logprobs vs a brute-force gather, the sampler's
frequencies, GPT-2 weight loading (HF layout written by hand here), checkpoints and input errors."""
import json
import os
import struct

import pytest
import torch
import torch.nn.functional as F

import checkpoint as C
import gpt2
import model as M
from common import Diverged, UserError
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def left_pad(rows, pad_id):
    """Independent left padding: list of 1-D token tensors -> idx (B, P), mask (B, P)."""
    P = max(len(r) for r in rows)
    idx = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P)
    for b, r in enumerate(rows):
        idx[b, P - len(r):], mask[b, P - len(r):] = r, 1
    return idx, mask


def right_pad(rows, pad_id):
    P = max(len(r) for r in rows)
    idx = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P)
    for b, r in enumerate(rows):
        idx[b, :len(r)], mask[b, :len(r)] = r, 1
    return idx, mask


ROWS = [torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 9)]


def test_causality():
    m = tiny()
    idx = torch.randint(0, 50257, (2, 20))
    other = idx.clone()
    other[:, 10:] = torch.randint(0, 50257, (2, 10))
    _, mask = left_pad([idx[0, 3:], idx[1]], 0)
    for am in (None, mask):
        a, b = m(idx, am), m(other, am)
        assert torch.equal(a[:, :10], b[:, :10])
        assert not torch.allclose(a[:, 10:], b[:, 10:])  # the change is visible where it may be


@pytest.mark.parametrize("pad_id", [0, 13])
def test_padded_batch_equals_rows_alone(pad_id):
    m = tiny()
    for pad in (left_pad, right_pad):
        idx, mask = pad(ROWS, pad_id)
        logits = m(idx, mask)  # (B, P, V)
        for b, r in enumerate(ROWS):
            alone = m(r[None])[0]  # (n, V)
            assert torch.allclose(logits[b][mask[b].bool()], alone, atol=1e-5)
    idx, mask = left_pad(ROWS, pad_id)
    tokens, rmask = m.generate(idx, mask, 10, temperature=0, eos_token_id=None)
    assert tokens.shape == (3, 10) and torch.equal(rmask, torch.ones(3, 10))
    for b, r in enumerate(ROWS):
        alone, _ = m.generate(r[None], None, 10, temperature=0, eos_token_id=None)
        assert torch.equal(tokens[b], alone[0])


def test_kv_cache_equals_full_forward():
    m = tiny()
    idx, mask = left_pad(ROWS, 7)
    P, R = idx.shape[1], 16
    tok_c, _, logits_c = m.generate(idx, mask, R, temperature=0, eos_token_id=None, return_logits=True)
    tok_n, _, logits_n = m.generate(idx, mask, R, temperature=0, eos_token_id=None, use_cache=False,
                                    return_logits=True)
    assert torch.equal(tok_c, tok_n)
    # the logits each token was chosen from = the full forward over prompt + response, position P-1+t
    full = m(torch.cat([idx, tok_c], 1), torch.cat([mask, torch.ones(3, R)], 1))  # (B, P+R, V)
    assert torch.allclose(logits_c, full[:, P - 1:P + R - 1], atol=1e-4)
    assert torch.allclose(logits_n, full[:, P - 1:P + R - 1], atol=1e-4)
    assert torch.equal(tok_c, full[:, P - 1:P + R - 1].argmax(-1))
    # sampling with top-k and one seed draws the same tokens either way
    g = lambda: torch.Generator().manual_seed(3)
    a, _ = m.generate(idx, mask, R, temperature=0.8, eos_token_id=None, generator=g())
    b, _ = m.generate(idx, mask, R, temperature=0.8, eos_token_id=None, generator=g(), use_cache=False)
    assert torch.equal(a, b)


def test_kv_cache_is_preallocated():
    cache = M.KVCache(n_layer=1, max_len=10)
    k = torch.randn(2, 3, 4, 5)
    k0, _ = cache.update(0, k, k, 0)
    k1, _ = cache.update(0, k[:, :, :1] + 1, k[:, :, :1], 4)
    assert k1.shape == (2, 3, 5, 5) and k0.data_ptr() == k1.data_ptr()  # one buffer, written in place
    assert torch.equal(k1[:, :, :4], k) and torch.equal(k1[:, :, 4:], k[:, :, :1] + 1)


def test_eos_stops_rows_and_ends_the_mask():
    m = tiny(seed=1, padded_vocab_size=8)  # small vocabulary: EOS (token 3) comes up often when sampling
    idx, mask = left_pad([torch.tensor([1, 2, 5]), torch.tensor([4]), torch.tensor([0, 6]), torch.tensor([7, 7])], 0)
    N, eos = 40, 3
    g = lambda: torch.Generator().manual_seed(0)
    free, _ = m.generate(idx, mask, N, eos_token_id=None, generator=g())  # same random stream, never stops
    first = [(row == eos).nonzero()[0, 0].item() for row in free]  # the test relies on every row hitting EOS
    tokens, rmask = m.generate(idx, mask, N, eos_token_id=eos, generator=g())
    R = max(first) + 1
    assert R < N and tokens.shape == rmask.shape == (4, R)  # early exit once every row is done
    for b, f in enumerate(first):
        assert torch.equal(rmask[b], (torch.arange(R) <= f).float())  # 1 through the first EOS, then 0
        assert torch.equal(tokens[b, :f + 1], free[b, :f + 1])


def test_last_token_index_and_scalar_read_out():
    for _ in range(20):
        mask = (torch.rand(6, 9) < 0.7).float()
        want = [max([t for t in range(9) if mask[b, t] == 1], default=0) for b in range(6)]
        assert M.last_token_index(mask).tolist() == want
    m = tiny(scalar_head=True)
    for pad in (left_pad, right_pad):
        idx, mask = pad(ROWS, 11)
        last = M.last_token_index(mask)
        assert last.tolist() == ([idx.shape[1] - 1] * 3 if pad is left_pad else [len(r) - 1 for r in ROWS])
        values = m.scalar(idx, mask)  # (B, T)
        scores = m.score(idx, mask)  # (B,)
        for b, r in enumerate(ROWS):
            alone = m.scalar(r[None])[0, -1]
            assert torch.allclose(values[b, last[b]], alone, atol=1e-5)
            assert torch.allclose(scores[b], alone, atol=1e-5)
    with pytest.raises(RuntimeError, match="scalar head"):
        tiny().scalar(idx, mask)


def test_logprobs_and_entropy_brute_force():
    m = tiny()
    idx, mask = left_pad(ROWS, 0)
    target_mask = mask * (torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) < 0.6)
    target_mask[:, 0] = 0
    rows = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    lp, ent = m.logprobs(idx, mask, target_mask, temperature=0.7, return_entropy=True)
    assert rows == [int(target_mask.sum())]  # logits only where a target is
    logits = m(idx, mask) / 0.7  # (B, T, V)
    for b in range(3):
        for t in range(idx.shape[1]):
            if target_mask[b, t]:
                logp = F.log_softmax(logits[b, t - 1], -1)
                assert torch.allclose(lp[b, t], logp[idx[b, t]], atol=1e-5)
                assert torch.allclose(ent[b, t], -(logp.exp() * logp).sum(), atol=1e-4)
            else:
                assert lp[b, t] == 0 and ent[b, t] == 0
    lp.sum().backward()  # gradients flow back to the weights
    assert m.lm_head.weight.grad is not None


def test_sampler_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    g = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.5):
        s = M.sample_from_logits(logits.expand(n, -1), temperature=temp, generator=g)
        counts = torch.bincount(s, minlength=6).double()
        expected = n * F.softmax(logits.double() / temp, -1)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 25  # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    big = torch.randn(4, 100, generator=g)
    assert torch.equal(M.sample_from_logits(big, temperature=0), big.argmax(-1))


def _hf_state_dict(m, prefix):
    """The OpenAI GPT-2 layout written by hand: Conv1D (in, out) weights, 50257-row wte, no lm_head."""
    sd = {}
    for k, v in m.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.removeprefix("transformer.")
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        if k == "wte.weight":
            v = v[:50257]
        sd[prefix + k] = v.contiguous().clone()
    T = m.config.block_size
    for i in range(m.config.n_layer):  # buffers the loader must skip
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
        sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def _write_safetensors(path, sd):
    header, chunks, offset = {}, [], 0
    for k, v in sd.items():
        data = v.to(torch.float32).numpy().astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def test_gpt2_layout_round_trip(tmp_path, monkeypatch):
    m = tiny()
    with torch.no_grad():
        m.transformer.wte.weight[50257:] = 0  # GPT-2 has no rows there; the loader pads them with zeros
    idx, mask = left_pad(ROWS, 0)
    want = m(idx, mask)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)
    torch.save(_hf_state_dict(m, ""), tmp_path / "pytorch_model.bin")
    os.makedirs(tmp_path / "st")
    _write_safetensors(tmp_path / "st" / "model.safetensors", _hf_state_dict(m, "transformer."))
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "st" / "model.safetensors"):
        loaded = gpt2.from_pretrained(str(path), **shape).eval()
        assert torch.equal(loaded(idx, mask), want)
    with open(tmp_path / "st" / "config.json", "w") as f:  # a folder with config.json needs no overrides
        json.dump({"n_head": 2}, f)
    loaded = gpt2.from_pretrained(str(tmp_path / "st"), scalar_head=True).eval()
    assert loaded.config.n_layer == 2 and loaded.scalar_head is not None and torch.equal(loaded(idx, mask), want)
    with pytest.raises(UserError, match="nowhere"):
        gpt2.from_pretrained(str(tmp_path / "nowhere"))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(gpt2.urllib.request, "urlretrieve", offline)
    with pytest.raises(UserError, match="by hand"):
        gpt2.from_pretrained("gpt2", cache_dir=str(tmp_path / "cache"))


def test_checkpoint_round_trip(tmp_path):
    m = tiny()
    idx, mask = left_pad(ROWS, 0)
    path = str(tmp_path / "out" / "sft.pt")
    C.save_checkpoint(path, torch.compile(m), {"lr": 1e-3}, "sft", step=5)  # a compiled model saves plain keys
    assert os.listdir(tmp_path / "out") == ["sft.pt"]  # no temporary file left
    ckpt = C.load_checkpoint(path, stage="sft")
    assert ckpt["config"] == {"lr": 1e-3} and ckpt["step"] == 5
    assert ckpt["model_args"]["n_tokens"] == 50257  # the vocabulary it was trained with (GPT-2's whole BPE here)
    assert ckpt["model_args"]["n_embd"] == 32 and not any("_orig_mod" in k for k in ckpt["model"])
    assert torch.equal(C.model_from_checkpoint(ckpt).eval()(idx, mask), m(idx, mask))
    rm = C.model_from_checkpoint(ckpt, scalar_head=True).eval()
    assert rm.scalar(idx, mask).shape == idx.shape and torch.equal(rm(idx, mask), m(idx, mask))
    C.save_checkpoint(path, rm, {}, "rm")
    assert C.model_from_checkpoint(C.load_checkpoint(path), scalar_head=False).scalar_head is None
    missing = str(tmp_path / "none.pt")
    with pytest.raises(UserError) as e:
        C.load_checkpoint(missing, stage="sft")
    assert missing in str(e.value) and "python sft.py" in str(e.value)


def test_a_checkpoint_written_before_the_padded_vocab_size_rename_loads_as_it_did(tmp_path):
    """Checkpoints written before GPTConfig.vocab_size was renamed padded_vocab_size hold "vocab_size" (the
    embedding's rows) in model_args: they load into the same model, with the same logits."""
    m = tiny(n_tokens=1000, padded_vocab_size=1024)  # a cut vocabulary: 1000 tokens, 24 padding rows
    idx, mask = left_pad([r % 1000 for r in ROWS], 0)
    path = str(tmp_path / "sft.pt")
    C.save_checkpoint(path, m, {}, "sft")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model_args"] = {("vocab_size" if k == "padded_vocab_size" else k): v for k, v in ckpt["model_args"].items()}
    torch.save(ckpt, path)  # as the code before the rename wrote it
    assert ckpt["model_args"]["vocab_size"] == 1024 and "padded_vocab_size" not in ckpt["model_args"]
    old = C.model_from_checkpoint(C.load_checkpoint(path, stage="sft", vocab_size=1000)).eval()
    assert old.config == m.config and old.transformer.wte.weight.shape == (1024, 32)
    assert torch.equal(old(idx, mask), m(idx, mask))
    assert torch.equal(C.model_from_checkpoint(ckpt, scalar_head=True).eval()(idx, mask), m(idx, mask))


def test_damaged_or_wrong_checkpoints_are_one_line_errors(tmp_path):
    """A truncated file, a file that is not a checkpoint, and a checkpoint of another stage: each a UserError
    naming the file and the command that writes it again."""
    good = str(tmp_path / "sft.pt")
    C.save_checkpoint(good, tiny(), {}, "sft")
    truncated = str(tmp_path / "cut.pt")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:3000])  # `head -c 3000 sft.pt`
    text = str(tmp_path / "notes.pt")
    with open(text, "w") as f:
        f.write("hello")
    other = str(tmp_path / "plain.pt")
    torch.save({"weights": torch.zeros(2)}, other)  # a torch file, but not one of ours
    for path, words in ((truncated, ["damaged", "python sft.py"]), (text, ["damaged", "python sft.py"]),
                        (other, ["not a checkpoint of this project", "python sft.py"]),
                        (good, ["is a sft checkpoint", "python sft.py", "a rm checkpoint", "python reward.py"])):
        with pytest.raises(UserError) as e:
            C.load_checkpoint(path, stage="rm" if path == good else "sft")
        msg = str(e.value)
        assert path in msg and "\n" not in msg and all(w in msg for w in words), msg


def test_a_checkpoint_of_another_vocabulary_is_a_one_line_error(tmp_path):
    """Token ids of one vocabulary mean other words in another: loading where another vocab_size is expected fails
    with one line naming the file, both sizes and the flag that fixes it; without vocab_size any loads."""
    path = str(tmp_path / "sft.pt")
    C.save_checkpoint(path, tiny(n_tokens=8192, padded_vocab_size=8192), {}, "sft")
    assert C.load_checkpoint(path, stage="sft", vocab_size=8192)["model_args"]["n_tokens"] == 8192
    assert C.load_checkpoint(path, stage="sft")["model_args"]["n_tokens"] == 8192
    for expected in (50257, 1024):
        with pytest.raises(UserError) as e:
            C.load_checkpoint(path, stage="sft", vocab_size=expected)
        msg = str(e.value)
        assert "\n" not in msg and path in msg and "8192" in msg and f"--vocab_size={expected}" in msg, msg
    old = str(tmp_path / "old.pt")  # written before n_tokens existed: GPT-2's vocabulary
    C.save_checkpoint(old, tiny(), {}, "sft")
    ckpt = torch.load(old, weights_only=False)
    del ckpt["model_args"]["n_tokens"]
    torch.save(ckpt, old)
    assert C.load_checkpoint(old, vocab_size=50257)["stage"] == "sft"
    with pytest.raises(UserError, match="50257"):
        C.load_checkpoint(old, vocab_size=8192)


def test_a_cut_vocabulary_masks_the_padding_rows_and_stops_at_its_own_eot():
    """n_tokens = 5 real tokens in 8 embedding rows: ids 5..7 get logit -1e9 (never sampled), <|endoftext|> is id 4,
    and generate() stops there by default, as it does with eos_token_id=4 given by hand."""
    m = tiny(seed=2, n_tokens=5, padded_vocab_size=8)
    assert m.eot_id == 4 and tiny().eot_id == 50256
    idx, mask = left_pad([torch.tensor([1, 2, 3]), torch.tensor([0])], 0)
    logits = m(idx, mask)
    assert torch.all(logits[..., 5:] == -1e9) and torch.all(logits[..., :5] > -1e8)
    g = lambda: torch.Generator().manual_seed(0)
    tokens, rmask = m.generate(idx, mask, 30, generator=g())
    by_hand, by_hand_mask = m.generate(idx, mask, 30, eos_token_id=4, generator=g())
    assert torch.equal(tokens, by_hand) and torch.equal(rmask, by_hand_mask)
    free, _ = m.generate(idx, mask, 30, eos_token_id=None, generator=g())
    assert free.max() < 5  # the padding ids never come up
    for b in range(2):  # the mask ends at the first EOT of the free-running rows (4 is likely among 5 tokens)
        hits = (free[b] == 4).nonzero()
        n = hits[0, 0].item() + 1 if len(hits) else 30
        assert rmask[b, :n].tolist() == [1.0] * n and rmask[b, n:].sum() == 0


def test_nan_weights_are_never_saved(tmp_path):
    path = str(tmp_path / "sft.pt")
    m = tiny()
    C.save_checkpoint(path, m, {}, "sft", step=1)
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match="nan"):
        C.save_checkpoint(path, m, {}, "sft", step=2)
    assert C.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["sft.pt"]


def test_generate_zero_new_tokens_is_empty():
    idx, mask = left_pad(ROWS, 0)
    tokens, response_mask = tiny().generate(idx, mask, 0)
    assert tokens.shape == (len(ROWS), 0) and response_mask.shape == (len(ROWS), 0)


def test_input_errors():
    m = tiny()
    idx = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="60.*5"):
        m.generate(idx, None, 5)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_bf16_autocast_and_compile_trace():
    m = tiny()
    idx, mask = left_pad(ROWS, 0)
    want = m(idx, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(idx, mask)
        tokens, rmask = m.generate(idx, mask, 5, eos_token_id=None)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1 and tokens.shape == (3, 5)
    traced = torch.compile(m, backend="eager", fullgraph=True)  # dynamo traces forward without graph breaks
    assert torch.allclose(traced(idx, mask), want)


def test_model_imports_nothing_of_the_pipeline():
    """model.py is the GPT alone (as nanoGPT's): importing it loads neither common nor checkpoint (no import circle)."""
    import subprocess
    import sys
    code = "import sys, model; bad = {'common', 'checkpoint', 'gpt2', 'data'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_bench_runs_at_any_vocabulary():
    """bench.py (figures, not timed asserts): a tiny configuration runs for a cut and for GPT-2's vocabulary and
    reports a positive rate for everything it measures."""
    import bench
    for V in (300, 50257):
        report = bench.main(["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                             "--batch_size=2", "--prompt_len=4", "--max_new_tokens=4", "--train_batch_size=2",
                             "--repeats=1", f"--vocab_size={V}"])
        assert {"train_tok_s", "generate_cache_tok_s", "generate_static_tok_s", "generate_nocache_tok_s"} <= set(report)
        assert all(v > 0 for v in report.values())


def test_bench_gpu_dry_run_on_the_cpu():
    """bench.py --gpu --device=cpu runs every path of the GPU benchmark at a tiny shape (dynamo's eager backend) and
    reports a positive figure for each; the static generator's and the compiled step's rows are there."""
    import bench
    report = bench.gpu_bench(["--device=cpu"])
    want = {"generate_nocache_tok_s", "generate_cache_tok_s", "generate_static_tok_s", "generate_static_compiled_tok_s",
            "train_eager_tok_s", "train_compiled_tok_s", "ppo_cache_iteration_s", "ppo_static_iteration_s",
            "ppo_static_generation_s", "ppo_static_update_s", "reward_steps_s", "dpo_steps_s"}
    assert want <= set(report) and all(report[k] > 0 for k in want)
