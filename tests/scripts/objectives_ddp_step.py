"""KoSimCSE training_step with the newer objectives on a fixed global batch, for the DDP equality test in
tests/test_objectives.py: STS pairs under --sts_loss cosent and angle (ranking losses over the whole batch,
gathered across ranks), and NLI triplets under hardness-weighted bidirectional InfoNCE, all with
--matryoshka_dims and gradient caching (--mini_batch_size 5).

    python objectives_ddp_step.py METHOD_DIR MODEL_DIR OUT.pt                    one process, whole batch
    torchrun --nproc_per_node 2 objectives_ddp_step.py METHOD_DIR MODEL_DIR OUT.pt   gloo, half a batch each

Writes (rank 0), per case, the loss averaged over ranks and every parameter gradient after backward.
"""
import os
import sys
import types

import torch
import torch.distributed as dist

method_dir, model_dir, out = sys.argv[1:4]
sys.path.insert(0, method_dir)
from model import SentenceEncoder  # noqa: E402
from train import training_step  # noqa: E402

world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
model = SentenceEncoder.from_pretrained(model_dir, pooler="mean", mini_batch_size=5).train()  # dropout 0
ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
B, L = 8, 6
g = torch.Generator().manual_seed(1)
common = dict(temperature=0.05, matryoshka_dims=[32, 16, 8], matryoshka_weights=[1.0, 0.5, 2.0])
cases = {"cosent": ("sts", 2, dict(sts_loss="cosent")), "angle": ("sts", 2, dict(sts_loss="angle")),
         "infonce": ("sup", 3, dict(hardness_mode="all_negatives", hardness_strength=5.0,
                                    infonce_directions=["query_to_doc", "doc_to_query"],
                                    infonce_partition="per_direction"))}
results = {}
for name, (source, k, options) in cases.items():
    ids = torch.randint(5, 100, (k, B, L), generator=g)  # (column, batch, length)
    mask = torch.ones_like(ids)
    mask[:, :, 4:] = torch.randint(0, 2, (k, B, 2), generator=g)
    scores = torch.rand(B, generator=g).round(decimals=1)  # ties too
    local = slice(rank * B // world, (rank + 1) * B // world)
    batch = {"input_ids": ids[:, local].reshape(-1, L), "attention_mask": mask[:, local].reshape(-1, L)}
    if source == "sts":
        batch["labels"] = scores[local]
    loss, _ = training_step(ddp, source, batch, types.SimpleNamespace(**common, **options), world)
    loss.backward()
    loss = loss.detach() / world  # what every rank backpropagates is world x the global loss
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    results[name] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}}
    model.zero_grad(set_to_none=True)
if rank == 0:
    torch.save(results, out)
if world > 1:
    dist.barrier()  # no rank tears gloo down while rank 0 is still saving
    dist.destroy_process_group()
