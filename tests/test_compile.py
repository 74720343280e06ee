"""torch.compile of the logprobs hot path (speed.CompiledLogprobs: ppo.py's and dpo.py's --compile) against the eager
model: the same logprobs on padded batches of several shapes, one graph per grad mode with no graph break and no
recompile (dynamo's own counters), at 2 and at 12 layers; generation untouched by it. The inductor test compiles
real kernels (tens of seconds: slow); the others trace with dynamo's eager backend (the graph-break and recompile
logic is dynamo's, whatever the backend)."""
import copy
import inspect

import pytest
import torch

from model import GPT, GPTConfig
from speed import CompiledLogprobs, answer_logprobs, answer_start

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny(n_layer=2, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=64, n_tokens=500,
                         padded_vocab_size=512)).eval()


def ppo_batch(B, P, R, seed):
    """A rollout's layout: left-padded prompts (P) + answers (R), target mask 1 on each answer through its EOS."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 500, (B, P + R), generator=g)
    prompt_mask = torch.ones(B, P)
    prompt_mask[0, :P // 2] = 0  # a shorter prompt, left-padded
    response_mask = torch.ones(B, R)
    response_mask[1, R // 2:] = 0  # an answer that ended early
    return idx, torch.cat([prompt_mask, response_mask], 1), torch.cat([torch.zeros(B, P), response_mask], 1)


def dpo_batch(B, T, seed):
    """Pairs' layout: right-padded prompt + response rows of different prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 500, (B, T), generator=g)
    attention_mask, target_mask = torch.ones(B, T), torch.zeros(B, T)
    for b in range(B):
        end, start = T - b, 3 + 2 * b
        attention_mask[b, end:] = 0
        target_mask[b, start:end] = 1
    return idx, attention_mask, target_mask


# the first: batch size = answer width (6): with duck sizing one symbol, and the next shape would recompile
BATCHES = [ppo_batch(6, 9, 6, 0), dpo_batch(4, 20, 1), ppo_batch(3, 14, 11, 2), dpo_batch(6, 31, 3)]


def dynamo_state():
    """A fresh dynamo (no cached graphs, zeroed counters); returns a function giving what was compiled since:
    graph breaks (their reasons), recompiles (their reasons) and graphs compiled."""
    import torch._dynamo
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    return lambda: dict(breaks=list(counters["graph_break"]),
                        recompiles=[m.recompile_reason for m in get_compilation_metrics() if m.recompile_reason],
                        graphs=counters["stats"]["unique_graphs"])


# isolate_recompiles (torch >= 2.12) keeps the graphs of one code object apart; without it (torch 2.11) the second grad
# mode, and a second return_entropy, are recompiles of the first graph: allowed there, and nothing else
ISOLATED = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def only_expected_recompiles(recompiles):
    if ISOLATED:
        return recompiles == []
    return all("grad_mode" in r or "return_entropy" in r for r in recompiles)


def test_answer_start_is_the_first_column_with_a_target():
    for _, _, target_mask in BATCHES:
        cols = [t for t in range(1, target_mask.shape[1]) if target_mask[:, t].any()]
        assert answer_start(target_mask) == cols[0]
    assert answer_start(torch.zeros(2, 5)) == 1  # no target: the whole row


def test_answer_logprobs_equal_logprobs_on_the_answer_slice():
    """The fixed-shape form (eager here) against logprobs: the same values and entropies on [first, T), and 0 where
    there is no target; the padded result of the wrapper is logprobs everywhere."""
    m = tiny()
    for idx, attn, target_mask in BATCHES:
        first = answer_start(target_mask)
        lp, ent = m.logprobs(idx, attn, target_mask, 0.8, return_entropy=True)  # (B, T)
        alp, aent = answer_logprobs(m, idx, attn, target_mask[:, first:], 0.8, return_entropy=True)  # (B, W)
        assert alp.shape == (idx.shape[0], idx.shape[1] - first)
        assert torch.allclose(alp, lp[:, first:], atol=1e-6) and torch.allclose(aent, ent[:, first:], atol=1e-5)
        assert torch.all(alp[target_mask[:, first:] == 0] == 0) and torch.all(lp[:, :first] == 0)


@pytest.mark.parametrize("n_layer", [2, 12])  # 12: GPT-2 small's depth, past dynamo's recompile_limit of 8
def test_one_graph_per_grad_mode_no_break_no_recompile(n_layer):
    """Dynamo's counters while the compiled logprobs run as PPO runs them: without gradients (the rollout), with them
    (the update), alternately, on batches of four shapes: two graphs compiled (one per grad mode), no graph break,
    no recompile; and the values are the eager model's."""
    m = tiny(n_layer)
    compiled = CompiledLogprobs(m, backend="eager")
    state = dynamo_state()
    for _ in range(2):  # a second pass over the shapes: steady state
        for idx, attn, target_mask in BATCHES:
            with torch.no_grad():
                assert torch.allclose(compiled(idx, attn, target_mask), m.logprobs(idx, attn, target_mask), atol=1e-5)
            compiled(idx, attn, target_mask).sum().backward()
    s = state()
    assert s["breaks"] == [] and only_expected_recompiles(s["recompiles"]) and s["graphs"] == 2, s


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on a small CPU
def test_inductor_logprobs_equal_eager_float32():
    """The inductor graphs against the eager model, float32, on padded batches of four shapes: logprobs to 1e-5
    (without and with gradients), the entropy to 1e-4 and the parameter gradients to 1e-4 of their scale; one graph
    per grad mode (and one for the entropy, a function of its own), no graph break, no recompile."""
    import torch._inductor.config
    with torch._inductor.config.patch(compile_threads=1):  # (monkeypatch's undo spoils the config on torch 2.11)
        check_inductor_logprobs()


def check_inductor_logprobs():
    m = tiny()
    ref = copy.deepcopy(m)
    compiled, compiled_entropy = CompiledLogprobs(m), CompiledLogprobs(m)
    state = dynamo_state()
    for i, (idx, attn, target_mask) in enumerate(BATCHES):
        with torch.no_grad():
            assert torch.allclose(compiled(idx, attn, target_mask, 0.8), ref.logprobs(idx, attn, target_mask, 0.8),
                                  atol=1e-5)
            lp, ent = compiled_entropy(idx, attn, target_mask, 0.8, return_entropy=True)
            ref_lp, ref_ent = ref.logprobs(idx, attn, target_mask, 0.8, return_entropy=True)
            assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-4)
        w = torch.randn(idx.shape, generator=torch.Generator().manual_seed(i))
        m.zero_grad()
        ref.zero_grad()
        lp, ref_lp = compiled(idx, attn, target_mask, 0.8), ref.logprobs(idx, attn, target_mask, 0.8)
        assert torch.allclose(lp, ref_lp, atol=1e-5)
        (lp * w).sum().backward()
        (ref_lp * w).sum().backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-4 * q.grad.abs().max().item()), name
    s = state()
    assert s["breaks"] == [] and only_expected_recompiles(s["recompiles"]) and s["graphs"] == 3, s


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_the_kv_cache_is_the_eager_one(temperature):
    """dpo.py's --compile sets policy.logprobs = CompiledLogprobs(policy); its report then samples answers with the KV
    cache. Generation stays out of the compiled region: the same tokens as an eager twin for a fixed seed, and no
    graph compiled while it runs (it used to recompile per layer's cache state)."""
    policy = tiny()
    twin = copy.deepcopy(policy)
    policy.logprobs = CompiledLogprobs(policy, backend="eager")
    idx, attn, target_mask = BATCHES[0]
    state = dynamo_state()
    with torch.no_grad():
        policy.logprobs(idx, attn, target_mask)  # the compiled region exists and is warm
    before = state()["graphs"]
    prompt, prompt_mask = idx[:, :9], attn[:, :9]
    tokens = [m.generate(prompt, prompt_mask, 12, temperature, generator=torch.Generator().manual_seed(5))[0]
              for m in (policy, twin)]
    assert torch.equal(tokens[0], tokens[1])
    assert state()["graphs"] == before == 1
