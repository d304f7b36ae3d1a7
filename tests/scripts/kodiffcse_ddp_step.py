"""One KoDiffCSE training_step (contrastive + lambda * replaced-token loss) on a fixed global batch, for
the DDP equality test in tests/test_kodiffcse.py.

    python kodiffcse_ddp_step.py METHOD_DIR MODEL_DIR GENERATOR_DIR OUT.pt            one process
    torchrun --nproc_per_node 2 kodiffcse_ddp_step.py METHOD_DIR MODEL_DIR GENERATOR_DIR OUT.pt

Writes (rank 0) the losses averaged over ranks and every parameter gradient after backward (DDP has
averaged them). Every rank holds the same number of real tokens, so the mean of the per-rank RTD means
is the global mean. Deterministic: the encoder has dropout 0, the generator runs in eval mode
(--generator_eval), and the masked views are given (the static masking path of training_step).
"""
import os
import sys
import types

import torch
import torch.distributed as dist

method_dir, model_dir, generator_dir, out = sys.argv[1:5]
sys.path.insert(0, method_dir)
from dataloader import masking_vocabulary  # noqa: E402
from common.tokenizer import load_tokenizer  # noqa: E402
from model import DiffCSE  # noqa: E402
from train import training_step  # noqa: E402

LAMBDA = 1.0  # large, so that a wrongly scaled RTD gradient cannot hide under the tolerance
world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)  # the same new projection and RTD head in every process
model = DiffCSE.from_pretrained(model_dir, generator_dir, masking_vocabulary(load_tokenizer(model_dir)),
                                projection="mlp", generator_eval=True)
model.train()
B, L = 8, 7
g = torch.Generator().manual_seed(1)
ids = torch.randint(5, 60, (B, L), generator=g)
ids = torch.stack([ids, ids])  # (views, batch, length): each sentence twice
mlm = ids.clone()
mlm[torch.rand(ids.shape, generator=g) < 0.4] = 4  # a fixed masking of both views
mask = torch.ones_like(ids)
local = slice(rank * B // world, (rank + 1) * B // world)
ids, mlm, mask = (t[:, local].reshape(-1, L) for t in (ids, mlm, mask))
batch = {"input_ids": torch.cat([ids, mlm]), "attention_mask": torch.cat([mask, mask])}  # as the static collator
ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
args = types.SimpleNamespace(masking="static_sep", temperature=0.05, lambda_weight=LAMBDA)
loss, logged = training_step(ddp, "wiki", batch, args, world)
loss.backward()
losses = torch.stack([logged["contrastive_loss"], logged["rtd_loss"]])
if world > 1:
    dist.all_reduce(losses)
    losses /= world
if rank == 0:
    torch.save({"losses": losses, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}}, out)
if world > 1:
    dist.barrier()  # no rank tears gloo down while another still works (seen: "terminate called" aborts)
    dist.destroy_process_group()
