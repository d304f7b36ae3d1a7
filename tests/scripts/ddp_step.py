"""One contrastive training step on a fixed global batch, for the DDP equality tests of KoSimCSE
(SentenceEncoder, pooler cls with its MLP) and KoSentenceT5 (SentenceT5 with the ST5 head).

    python ddp_step.py METHOD_DIR MODEL_DIR OUT.pt [MINI]        one process, the whole batch
    torchrun --nproc_per_node 2 ddp_step.py METHOD_DIR MODEL_DIR OUT.pt [MINI]   gloo, half a batch each

MINI > 0 turns on gradient caching over chunks of MINI sentences (--mini_batch_size).

Writes (rank 0) the loss and every parameter gradient after backward (DDP has averaged them).
"""
import os
import sys

import torch
import torch.distributed as dist

method_dir, model_dir, out = sys.argv[1:4]
mini = int(sys.argv[4]) if len(sys.argv) > 4 else 0
sys.path.insert(0, method_dir)
import model as method_model  # noqa: E402
from common.encoding import gather_columns  # noqa: E402
from model import contrastive_loss  # noqa: E402

world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)  # the same new head in every process
if hasattr(method_model, "SentenceT5"):
    model = method_model.SentenceT5.from_pretrained(model_dir, arch="t5", st5_head=True, mini_batch_size=mini)
    model.eval()  # no dropout: deterministic (gradients flow all the same)
else:
    model = method_model.SentenceEncoder.from_pretrained(model_dir, pooler="cls", mlp_only_train=False,
                                                      mini_batch_size=mini)
    model.train()  # the test model has dropout 0, so train mode is deterministic
B, L = 8, 6
g = torch.Generator().manual_seed(1)
ids = torch.randint(5, 100, (3, B, L), generator=g)  # (columns, batch, length)
mask = torch.ones_like(ids)
mask[:, :, 4:] = torch.randint(0, 2, (3, B, 2), generator=g)
local = slice(rank * B // world, (rank + 1) * B // world)
ids, mask = ids[:, local].reshape(-1, L), mask[:, local].reshape(-1, L)
ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
loss = contrastive_loss(gather_columns(ddp(input_ids=ids, attention_mask=mask), 3), 3, 0.05)
(loss * world).backward()
if rank == 0:
    torch.save({"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}}, out)
if world > 1:
    dist.barrier()  # no rank tears the group down while rank 0 is still saving
    dist.destroy_process_group()
