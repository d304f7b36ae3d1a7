"""One KoSBERT step of each objective (NLI softmax, then STS regression) on a fixed global batch, for
the DDP equality test in tests/test_kosbert_scale.py.

    python kosbert_ddp_step.py METHOD_DIR MODEL_DIR OUT.pt                    one process, whole batch
    torchrun --nproc_per_node 2 kosbert_ddp_step.py METHOD_DIR MODEL_DIR OUT.pt   gloo, half a batch each

Writes (rank 0), per objective, the loss averaged over ranks and every parameter gradient after
backward (DDP has averaged them), through train.training_step as the training loop calls it.
"""
import os
import sys

import torch
import torch.distributed as dist

method_dir, model_dir, out = sys.argv[1:4]
sys.path.insert(0, method_dir)
from model import PairObjective, SentenceEncoder, SoftmaxClassifier  # noqa: E402
from train import training_step  # noqa: E402

world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)  # the same classifier in every process
objective = PairObjective(SentenceEncoder.from_pretrained(model_dir, pooler="mean"), SoftmaxClassifier(32))
objective.train()  # the test model has dropout 0, so train mode is deterministic
ddp = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True) if world > 1 else objective
B, L = 8, 6
g = torch.Generator().manual_seed(1)
results = {}
for source, labels in (("nli", torch.randint(0, 3, (B,), generator=g)), ("sts", torch.rand(B, generator=g))):
    ids = torch.randint(5, 100, (2, B, L), generator=g)  # (sentence 1 / sentence 2, batch, length)
    mask = torch.ones_like(ids)
    mask[:, :, 4:] = torch.randint(0, 2, (2, B, 2), generator=g)
    local = slice(rank * B // world, (rank + 1) * B // world)
    batch = {"input_ids": ids[:, local].reshape(-1, L), "attention_mask": mask[:, local].reshape(-1, L),
             "labels": labels[local]}
    loss, _ = training_step(ddp, source, batch, None, world)
    loss.backward()
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    results[source] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in objective.named_parameters()
                                                if p.grad is not None}}
    objective.zero_grad(set_to_none=True)
if rank == 0:
    torch.save(results, out)
if world > 1:
    dist.barrier()  # no rank tears gloo down while rank 0 is still saving
    dist.destroy_process_group()
