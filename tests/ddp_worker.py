"""Run by tests/test_common.py under torchrun: a few AdamW steps of a tiny GPT with gloo, each rank on its
own batch, gradients averaged with common.all_reduce_grads. Rank 0 also replays the same steps in one
process on the mean loss of both batches, which is what DDP must equal; and common.global_std of the two
ranks' scores, next to the std of their union."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from types import SimpleNamespace  # noqa: E402

from common import all_reduce_grads, cleanup, configure_optimizer, global_std, setup_runtime  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

out = sys.argv[1]
rt = setup_runtime(SimpleNamespace(device="cpu", dtype="float32", seed=0))
torch.manual_seed(0)  # same init on every rank
model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
reference = copy.deepcopy(model)
batches = [torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(r)) for r in range(2)]


def loss_of(m, idx):
    logits = m(idx)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))


opt = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
for _ in range(3):
    loss_of(model, batches[rt.rank]).backward()
    all_reduce_grads(model, rt)
    opt.step()
    opt.zero_grad()
torch.save(model.state_dict(), os.path.join(out, f"rank{rt.rank}.pt"))
# global_std: the std of the union of both ranks' scores (3 and 5 entries), not the mean of their stds
scores = [torch.randn(3 + 2 * r, generator=torch.Generator().manual_seed(10 + r)) * (1 + 4 * r) for r in range(2)]
std = global_std(scores[rt.rank], rt)
if rt.master:
    torch.save({"global": std, "union": torch.cat(scores).std().item()}, os.path.join(out, "std.pt"))
if rt.master:
    opt = configure_optimizer(reference, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        (0.5 * (loss_of(reference, batches[0]) + loss_of(reference, batches[1]))).backward()
        opt.step()
        opt.zero_grad()
    torch.save(reference.state_dict(), os.path.join(out, "single.pt"))
cleanup(rt)
