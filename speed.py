"""
The speed machinery, one import away from the math: nothing here changes what is computed, only how fast it runs.
model.py stays the readable reference (its logprobs and its generate); each fast path here is tested against it.

- torch_compile(fn, **options): torch.compile with the options this torch knows (a newer keyword is dropped on an older
  torch, so the compiled paths run on every torch in the tested range of requirements.txt).
- CompiledLogprobs: model.logprobs as one torch.compile graph per grad mode (--compile in ppo.py and dpo.py).
- StaticGenerator: model.generate with a static KV cache and a decode step whose shapes never change, so it compiles
  to one graph and, on CUDA, replays as a CUDA graph: a few kernel launches per token instead of hundreds
  (--fast_generation). The same tokens as model.generate (greedy, and sampled with the same generator).
- generate_fn(model, rt): the generate a stage samples answers with (model.generate, or its StaticGenerator).
"""
import collections
import inspect
import weakref

import torch
import torch.fx.experimental._config as shape_config  # torch.compile's dynamic-shape settings
import torch.nn.functional as F

from model import GPT, KVCache, position_ids, sample_from_logits


# ----------------------------------------------------------------------------------------------------
# torch.compile across torch versions

def torch_compile(fn, **options):
    """torch.compile(fn, **options) without the options this torch's torch.compile does not take (e.g.
    isolate_recompiles, new in torch 2.12): the code then runs as on that torch (there: one recompile on the grad
    mode, where isolate_recompiles keeps two graphs apart), never a TypeError. Returns the compiled callable."""
    known = inspect.signature(torch.compile).parameters
    return torch.compile(fn, **{k: v for k, v in options.items() if k in known})


def answer_start(target_mask):
    """The first position t >= 1 at which any row has a target: every target lies in [t, T).
    target_mask (B, T) 0/1 -> int (1 when there is no target). Reads the mask on the host (a device sync)."""
    return 1 + int(target_mask[:, 1:].any(0).int().argmax())  # argmax: the first maximum


def answer_logprobs(model, idx, attention_mask, answer_mask, temperature=1.0, return_entropy=False):
    """model.logprobs of the last W tokens with shapes set by the inputs' shapes, never by their values: what
    torch.compile traces as one graph (logprobs' h[sel] has a data-dependent shape, a graph break).
    idx (B, T) long, attention_mask (B, T) 0/1, answer_mask (B, W) 0/1 over tokens T-W .. T-1, 1 <= W < T.
    Logits at all B x W positions, then masked. Returns logprobs (B, W) float32, 0 where answer_mask is 0,
    and with return_entropy also the entropy (B, W); model.logprobs(...)[:, -W:] up to float rounding."""
    (B, T), W = idx.shape, answer_mask.shape[1]
    keep = answer_mask.bool()  # (B, W)
    h = model.hidden_states(idx, attention_mask)[:, T - W - 1:T - 1]  # (B, W, C): h[:, j] predicts token T-W+j
    targets = torch.where(keep, idx[:, T - W:], 0)  # (B, W) a pad id may lie outside the vocabulary
    lp, ent = model.token_logprobs(h, targets, temperature, return_entropy)  # (B, W) x2
    if not return_entropy:
        return torch.where(keep, lp, 0.0)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


class CompiledLogprobs:
    """model.logprobs through torch.compile: called like it, with the same (B, T) result (up to float rounding).
    What makes it one graph that never recompiles in steady state:
    - the graph is answer_logprobs on the answer slice [first, T) of the batch (first = answer_start, found here,
      outside the graph): its shapes follow the inputs' shapes (dynamic=True: any B, T, W), not the mask's values;
      fullgraph=True makes a graph break an error;
    - one compiled function per grad mode: a function compiled with gradients recompiles when called without
      (the rollout and the evaluations run without gradients, the update with them); isolate_recompiles keeps
      the two apart where this torch has it (they share the code object of answer_logprobs);
    - no duck sizing: by default sizes equal at the first call (a rollout of 128 answers of 128 tokens) become one
      symbol, and the first call where they differ recompiles.
    Generation never enters it."""

    def __init__(self, model, backend="inductor"):
        graph = lambda: torch_compile(lambda *a: answer_logprobs(model, *a), dynamic=True, fullgraph=True,
                                      backend=backend, isolate_recompiles=True)
        self.graphs = {True: graph(), False: graph()}  # by torch.is_grad_enabled(); each compiles at its first call

    def __call__(self, idx, attention_mask, target_mask, temperature=1.0, return_entropy=False):
        first = answer_start(target_mask)
        answer_mask = target_mask[:, first:].contiguous()  # (B, W): the answer slice, W = T - first
        with shape_config.patch(use_duck_shape=False):
            out = self.graphs[torch.is_grad_enabled()](idx, attention_mask, answer_mask, temperature, return_entropy)
        if not return_entropy:
            return F.pad(out, (first, 0))  # (B, T): back on token positions
        return tuple(F.pad(x, (first, 0)) for x in out)


# ----------------------------------------------------------------------------------------------------
# generation with a static KV cache

class StaticKVCache(KVCache):
    """model.KVCache over preallocated buffers k, v (n_layer, B, nh, L, hs). The prompt (an int start) is written
    and read as KVCache does; a decoded token (start a (1,) long tensor, its position) is written in place with
    index_copy_ and ALL L keys are returned: the decode step's attention mask hides the positions after it."""

    def __init__(self, k, v):
        self.max_len, self.k, self.v = k.shape[3], k, v

    def update(self, layer, k, v, start):
        if isinstance(start, int):
            return super().update(layer, k, v, start)
        self.k[layer].index_copy_(2, start, k)
        self.v[layer].index_copy_(2, start, v)
        return self.k[layer], self.v[layer]  # (B, nh, L, hs)


class DecodeState:
    """The buffers of one generation shape (B rows, L cache positions), allocated once and rewritten by every call:
    what the decode step reads and writes, so that its inputs sit at fixed addresses (a CUDA graph replays on them).
      seq (B, L) long       prompt at [0, P), each sampled token at the position after the last
      mask (B, L) float     the prompt's attention mask, then 1s
      positions (B, L) long position ids (model.position_ids of mask)
      response_mask (B, L)  1 where a sampled token counts (up to and including the row's first EOS)
      done (B,) bool        the row has emitted EOS
      pos (1,) long         position of the last token: the step samples the token at pos + 1
      uniform (B, 1) f64    this step's uniform draws (model.sample_from_logits), drawn outside the step
    and the KV cache (StaticKVCache, zeros where nothing was written: masked keys must be finite)."""

    def __init__(self, model, B, L, dtype, device):
        c = model.config
        shape = (c.n_layer, B, c.n_head, L, c.n_embd // c.n_head)
        self.cache = StaticKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                   torch.zeros(shape, dtype=dtype, device=device))
        self.seq = torch.zeros(B, L, dtype=torch.long, device=device)
        self.mask = torch.ones(B, L, device=device)
        self.positions = position_ids(self.mask)
        self.response_mask = torch.zeros(B, L, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.uniform = torch.zeros(B, 1, dtype=torch.float64, device=device)
        self.key_index = torch.arange(L, device=device)  # (L,)
        self.graph = None  # the CUDA graph of one decode step, once captured

    def start(self, idx, attention_mask):
        """Reset for prompts idx (B, P) long with attention_mask (B, P) 0/1 (None: no padding)."""
        P = idx.shape[1]
        self.seq[:, :P] = idx
        self.mask.fill_(1)
        if attention_mask is not None:
            self.mask[:, :P] = attention_mask
        self.positions.copy_(position_ids(self.mask))
        self.response_mask.zero_()
        self.done.zero_()


def emit(state, tok, eos_token_id):
    """Write the sampled tokens tok (B,) long at position pos + 1 (an EOS filler in rows already done), mark them
    in response_mask (1 unless the row was done before), update done, and advance pos. All in place."""
    nxt = state.pos + 1  # (1,)
    if eos_token_id is not None:
        tok = torch.where(state.done, eos_token_id, tok)
    state.seq.index_copy_(1, nxt, tok[:, None])
    state.response_mask.index_copy_(1, nxt, (~state.done).float()[:, None])
    if eos_token_id is not None:
        state.done |= tok == eos_token_id
    state.pos.copy_(nxt)


def decode_step(model, state, temperature, eos_token_id):
    """One token for every row, with shapes fixed by (B, L) alone and no host sync: the last token (at pos) against
    the cached keys and values of [0, pos], the next one sampled from softmax(logits / temperature) with
    state.uniform (model.sample_from_logits; temperature 0 = greedy) and written by emit. Reads and writes `state`
    in place; returns nothing."""
    pos = state.pos  # (1,)
    tok = state.seq.index_select(1, pos)  # (B, 1)
    x = model.transformer.wte(tok) + model.transformer.wpe(state.positions.index_select(1, pos))  # (B, 1, C)
    visible = (state.key_index <= pos) & state.mask.bool()  # (B, L): causal, and the key is real
    mask = visible[:, None, None, :]  # (B, 1, 1, L)
    for i, block in enumerate(model.transformer.h):
        x = block(x, mask, state.cache, i, pos)
    logits = model.lm_logits(model.transformer.ln_f(x)[:, -1])  # (B, V)
    emit(state, sample_from_logits(logits, temperature, uniform=state.uniform), eos_token_id)


class StaticGenerator:
    """model.generate, fast: called like it, with the same tokens and response mask (greedy, and sampled with the same
    generator: the same uniform draws in the same order) up to float rounding in the attention (the static cache
    attends over all L positions, masked, where model.generate attends over the first n).
    - The prompt is prefilled eagerly (model.hidden_states with the cache), as in model.generate.
    - Each further token is one decode_step over the DecodeState of its shape (B, L), L = P + max_new_tokens rounded
      up to a multiple of 64 (at most block_size), so that prompts of nearby lengths share one state and one graph;
      the last `keep` states are kept.
    - compiled=True: the decode step goes through torch.compile (one graph, fullgraph); cuda_graph=True (on CUDA): it
      is captured once per state as a CUDA graph and replayed; a capture that fails falls back to the plain step,
      with a warning.
    - No host sync per token on CUDA: whether every row is done is read every `check_every` steps (None: 8 on CUDA,
      1 on the CPU, where reading it costs nothing), so up to check_every - 1 steps more than needed may run (rows
      already done get EOS fillers); their uniform draws advance the generator, so with check_every > 1 the
      generator's state after a call, not its tokens, can differ from model.generate's. With check_every = 1 it is
      model.generate's too.
    return_logits=True or use_cache=False run model.generate itself."""

    def __init__(self, model, compiled=False, cuda_graph=True, check_every=None, keep=4):
        self.model, self.check_every, self.keep, self.cuda_graph = model, check_every, keep, cuda_graph
        self.step = torch_compile(decode_step, fullgraph=True) if compiled else decode_step
        self.states = collections.OrderedDict()

    def state_for(self, B, L, dtype, device, temperature, eos_token_id):
        key = (B, L, dtype, str(device), temperature, eos_token_id)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= self.keep:
            self.states.popitem(last=False)
        state = self.states[key] = DecodeState(self.model, B, L, dtype, device)
        if self.cuda_graph and state.seq.is_cuda:
            self.capture(state, temperature, eos_token_id, dtype)
        return state

    def capture(self, state, temperature, eos_token_id, dtype):
        """Record one decode step on `state` as a CUDA graph (warm-up steps on a side stream first, as torch.cuda.graph
        requires; autocast without its weight cache, which a graph cannot hold). The warm-up writes into the state,
        which start() and the prefill rewrite before it is read."""
        run = lambda: self.run_step(state, temperature, eos_token_id, dtype)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            state.graph = graph
        except RuntimeError as e:  # e.g. an op this torch cannot capture: the plain step still works
            print(f"warning: the decode step could not be captured as a CUDA graph ({str(e).splitlines()[0][:120]}); "
                  "generating without one")

    def run_step(self, state, temperature, eos_token_id, dtype):
        """One decode step on `state` under autocast to `dtype` (float32: none), its weight cache off (a CUDA graph
        cannot hold it)."""
        with torch.autocast(state.seq.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            self.step(self.model, state, temperature, eos_token_id)

    @torch.no_grad()
    def __call__(self, idx, attention_mask, max_new_tokens, temperature=1.0, eos_token_id="eot", generator=None,
                 use_cache=True, return_logits=False):
        model = self.model
        if return_logits or not use_cache or max_new_tokens <= 0:
            return GPT.generate(model, idx, attention_mask, max_new_tokens, temperature, eos_token_id, generator,
                                use_cache, return_logits)
        B, P = idx.shape
        model.check_generation_fits(P, max_new_tokens)
        eos_token_id = model.eot_id if eos_token_id == "eot" else eos_token_id
        L = min(-(-(P + max_new_tokens) // 64) * 64, model.config.block_size)
        device_type = idx.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        state = self.state_for(B, L, dtype, idx.device, temperature, eos_token_id)
        state.start(idx, attention_mask)
        draw = lambda: torch.rand(B, 1, generator=generator, device=idx.device, dtype=torch.float64)
        # the first token: prefill the cache with the prompt (as model.generate does), sample, emit at position P
        h = model.hidden_states(idx, state.mask[:, :P], state.cache, 0)[:, -1]  # (B, C)
        state.pos.fill_(P - 1)
        emit(state, sample_from_logits(model.lm_logits(h), temperature, generator), eos_token_id)
        check_every = self.check_every or (8 if idx.is_cuda else 1)
        for t in range(1, max_new_tokens):
            if eos_token_id is not None and (t - 1) % check_every == 0 and bool(state.done.all()):
                break  # every row has emitted EOS (read after tokens 0, check_every, 2 check_every, ...)
            if temperature != 0:
                state.uniform.copy_(draw())
            if state.graph is not None:
                state.graph.replay()
            else:
                self.run_step(state, temperature, eos_token_id, dtype)
        response_mask = state.response_mask[:, P:P + max_new_tokens]  # (B, max_new_tokens)
        R = int(response_mask.sum(1).max())  # model.generate stops at the step where the last row emitted EOS
        return state.seq[:, P:P + R].clone(), response_mask[:, :R].clone()


_generators = weakref.WeakKeyDictionary()  # model -> its StaticGenerator


def generate_fn(model, rt):
    """The generate a stage samples with: model.generate, or with rt.fast_generation the model's StaticGenerator
    (made at the first call, kept while the model lives). Its decode step is not compiled in the stages, whatever
    --compile says: each (batch, cache length, temperature) would compile a graph of its own, tens of seconds each on
    a GPU, where the CUDA graph alone removes the launches (bench.py --gpu measures both)."""
    if not getattr(rt, "fast_generation", False):
        return model.generate
    if model not in _generators:
        _generators[model] = StaticGenerator(model)
    return _generators[model]
