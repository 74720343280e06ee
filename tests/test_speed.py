"""speed.py against model.py, the readable reference: StaticGenerator gives model.generate's tokens and response mask
(greedy and sampled with one seed, left-padded prompts, rows that stop at EOS at different steps, prompts of several
lengths sharing one static cache), its decode step compiles to one graph that never recompiles across steps and
calls, compile options a torch lacks are dropped (the compiled logprobs run under a torch.compile without
isolate_recompiles, as torch 2.11's), and --dtype=auto falls back to float32 on a GPU without bfloat16."""
from types import SimpleNamespace

import pytest
import torch

import common
import speed
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny(seed=0, n_tokens=40, padded_vocab_size=64, block_size=96):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, n_tokens=n_tokens,
                         padded_vocab_size=padded_vocab_size)).eval()


def prompts(B, P, seed, n_tokens):
    """Left-padded prompts: row b has P - (b % 3) * 2 real tokens (a row of P pads is allowed too)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_tokens, (B, P), generator=g)
    real = torch.tensor([max(P - (b % 3) * 2, 1) for b in range(B)])
    mask = (torch.arange(P)[None] >= (P - real)[:, None]).float()  # (B, P)
    return idx, mask


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("eos", [None, "eot"])
def test_static_generator_gives_the_tokens_of_generate(temperature, eos):
    m = tiny()
    fast = speed.StaticGenerator(m)
    for B, P, N in ((5, 9, 40), (5, 11, 30), (3, 4, 60)):  # the first two share one state: (5, 64)
        idx, mask = prompts(B, P, B * P, 40)
        want = m.generate(idx, mask, N, temperature, eos, torch.Generator().manual_seed(P))
        got = fast(idx, mask, N, temperature, eos, torch.Generator().manual_seed(P))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(fast.states) == 2


def test_static_generator_stops_where_generate_stops():
    """A vocabulary of 8 tokens, EOS (3) drawn often: rows finish at different steps, and the result has
    model.generate's width (the step at which the last row emitted EOS), not a multiple of check_every; read after
    every step (the CPU's default), the sampler ends where model.generate leaves it."""
    m = tiny(seed=1, n_tokens=8, padded_vocab_size=8, block_size=64)
    idx, mask = prompts(6, 4, 0, 8)
    fast = speed.StaticGenerator(m, check_every=8)
    every_step = speed.StaticGenerator(m)  # on the CPU: done read after every step
    widths = set()
    for seed in range(8):
        g_want, g_got, g_every = (torch.Generator().manual_seed(seed) for _ in range(3))
        want = m.generate(idx, mask, 40, 1.0, 3, g_want)
        got = fast(idx, mask, 40, 1.0, 3, g_got)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        got = every_step(idx, mask, 40, 1.0, 3, g_every)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(g_every.get_state(), g_want.get_state())  # the sampler where model.generate leaves it
        widths.add(want[0].shape[1])
    assert len(widths) > 1 and max(widths) < 40  # the test exercises early and varied stops


def test_static_generator_checks_its_input_like_generate():
    m = tiny(block_size=32)
    with pytest.raises(ValueError, match="block_size"):
        speed.StaticGenerator(m)(torch.zeros(1, 30, dtype=torch.long), None, 5)
    tokens, rmask = speed.StaticGenerator(m)(torch.zeros(2, 3, dtype=torch.long), None, 0)
    assert tokens.shape == rmask.shape == (2, 0)


def test_compiled_decode_step_is_one_graph_without_recompiles():
    """The decode step under torch.compile (dynamo's eager backend: the graph-break and recompile logic is dynamo's
    whatever the backend), fullgraph: one graph for a (B, L, temperature, EOS) setting, however many steps and calls,
    and the tokens of model.generate."""
    import torch._dynamo
    from torch._dynamo.utils import counters, get_compilation_metrics
    m = tiny()
    fast = speed.StaticGenerator(m)
    fast.step = speed.torch_compile(speed.decode_step, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    for P in (9, 11, 9):  # one state (L = 64) for all three
        idx, mask = prompts(4, P, P, 40)
        want = m.generate(idx, mask, 30, 1.0, None, torch.Generator().manual_seed(P))
        got = fast(idx, mask, 30, 1.0, None, torch.Generator().manual_seed(P))
        assert torch.equal(got[0], want[0])
    recompiles = [x.recompile_reason for x in get_compilation_metrics() if x.recompile_reason]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and not recompiles


def test_generate_fn_picks_by_the_runtime():
    m = tiny()
    assert speed.generate_fn(m, SimpleNamespace(fast_generation=False, compile=False)) == m.generate
    fast = speed.generate_fn(m, SimpleNamespace(fast_generation=True, compile=False))
    assert isinstance(fast, speed.StaticGenerator) and fast.model is m
    assert speed.generate_fn(m, SimpleNamespace(fast_generation=True, compile=False)) is fast  # one per model


def test_compile_options_a_torch_lacks_are_dropped(monkeypatch):
    """torch 2.11's torch.compile has no isolate_recompiles: speed.compile leaves it out, and the compiled logprobs
    run (and give model.logprobs) instead of raising TypeError."""
    real, seen = torch.compile, []

    def old_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
                    disable=False):
        seen.append(backend)
        return real(model, fullgraph=fullgraph, dynamic=dynamic, backend="eager", mode=mode, options=options,
                    disable=disable)

    monkeypatch.setattr(torch, "compile", old_compile)
    m = tiny()
    compiled = speed.CompiledLogprobs(m, backend="eager")
    idx, mask = prompts(3, 12, 0, 40)
    target_mask = torch.cat([torch.zeros(3, 6), torch.ones(3, 6)], 1)
    with torch.no_grad():
        assert torch.allclose(compiled(idx, mask, target_mask), m.logprobs(idx, mask, target_mask), atol=1e-5)
    assert seen == ["eager", "eager"]  # both graphs went through the old signature
    with pytest.raises(TypeError):  # the option itself really is unknown to it
        old_compile(m.logprobs, isolate_recompiles=True)


def test_auto_dtype_falls_back_to_float32_without_bfloat16(monkeypatch, capsys):
    assert common.auto_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert common.auto_dtype("cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert common.auto_dtype("cuda") == "float32"
    assert "Tesla T4 has no bfloat16" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CUDA preset: dtype auto, resolved here
    import ppo
    cfg = common.parse_config(ppo.config, ["--device=cuda"], cuda_overrides=ppo.cuda_config, verbose=False)
    assert cfg.dtype == "float32" and cfg.fast_generation
