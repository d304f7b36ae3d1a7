# Copied from KoSimCSE/common/stages.py (whole file; delete this line to own it)
"""How a stage trains: its plan (``Stage``), its training sources and the order their batches take
(``interleave``, ``stage_batches``), the optimizer and schedule (one, or one per source), torch.distributed
set-up and DDP, mixed precision."""
import dataclasses
import math
import os

import torch
import torch.distributed as dist
from transformers import get_linear_schedule_with_warmup

from .checkpoint import load_checkpoint, restore_rng
from .dev import best_score_text


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of a run, built with keywords: ``Stage(name="sts", sources=("sts",), epochs=4,
    start_from="nli_model")``."""
    name: str  # logged with every record; a resumed run restarts in the stage of its checkpoint
    sources: tuple  # the names of its training sources (see the folder's build_source)
    epochs: int
    best_dir: str = "best_model"  # the folder under --output_dir its best model goes to
    start_from: str = None  # the best_dir of an earlier stage it starts from (None: --model)
    lr: float = None  # its learning rate (None: --lr)
    schedule: str = "proportional"  # how its sources share the steps (``interleave``'s rule): "proportional",


class PerSource(list):
    """The optimizers (or schedules) of a stage: one shared by every source, or one per source (a "paired"
    stage); ``of(i)`` is source i's. Saved and restored as one: a single one as its own state dict."""

    def of(self, i):
        return self[i if len(self) > 1 else 0]

    def state_dict(self):
        return self[0].state_dict() if len(self) == 1 else [x.state_dict() for x in self]

    def load_state_dict(self, state):
        for x, s in zip(self, [state] if len(self) == 1 else state):
            x.load_state_dict(s)


def start_stage(args, stage, trainable, schedule, total_steps, state, rank, log):
    """The optimizers (build_optimizer), linear warmup-then-decay schedules and the fp16 loss scaler of one
    stage, put back to ``state`` (a checkpoint of this stage, or None) with rank 0's RNG state. A "paired"
    stage gives every source its own optimizer and schedule over that source's own steps, as
    sentence-transformers' fit does for each objective. Returns (optimizers, schedulers (PerSource), scaler,
    step, best dev score)."""
    scaler = torch.amp.GradScaler("cuda", enabled=args.fp16)
    full, rest = divmod(total_steps, len(schedule))
    steps = ([full * schedule.count(i) + schedule[:rest].count(i) for i in range(len(stage.sources))]
             if stage.schedule == "paired" else [total_steps])
    optimizer = PerSource(build_optimizer(trainable, stage.lr or args.lr, args.weight_decay) for _ in steps)
    scheduler = PerSource(get_linear_schedule_with_warmup(o, int(args.warmup_ratio * n), n)
                          for o, n in zip(optimizer, steps))
    if state is None:
        return optimizer, scheduler, scaler, 0, -math.inf
    step, best_score = load_checkpoint(state, trainable, optimizer, scheduler, scaler)
    if rank == 0:
        restore_rng(state["rng"])
    else:  # only rank 0's RNG state is saved; the others get fresh (seeded) dropout masks
        torch.manual_seed(args.seed + rank + step)
    log(f"[{stage.name}] resuming {args.output_dir} at step {step:,} (best dev {best_score_text(best_score)})")
    return optimizer, scheduler, scaler, step, best_score


def setup_distributed(args):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPU; each process drives one GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def barrier(world):
    if world > 1:
        dist.barrier()


def together(world, fn):
    """``fn()`` on every rank, then a barrier that also carries failure: if ``fn`` stopped any rank (a one-line
    SystemExit such as --decontaminate drop leaving nothing, or any exception in rank 0's share of the set-up),
    every rank stops, the failed ones with their own error and the others with one line pointing at it, instead
    of waiting forever at the next barrier. Returns ``fn()``'s value."""
    if world == 1:
        return fn()
    failure = None
    try:
        value = fn()
    except BaseException as e:  # noqa: B036 -- SystemExit and KeyboardInterrupt included: the others must know
        failure = e
    stopped = [None] * world
    dist.all_gather_object(stopped, failure is not None)
    if not any(stopped):
        return value
    rank = dist.get_rank()
    dist.destroy_process_group()  # every rank is stopping: leave the group cleanly, not by an abort at exit
    if failure is not None:
        raise failure
    ranks = ", ".join(str(r) for r, s in enumerate(stopped) if s)
    raise SystemExit(f"error: rank {ranks} of this run stopped (its message is above); rank {rank} stops too")


def wrap_ddp(trainable, world, several_sources):
    """``trainable`` in DistributedDataParallel under torchrun (itself in one process). With several sources,
    parameters idle on one source's batches (KoSBERT's classifier) must not be waited for."""
    if world == 1:
        return trainable
    return torch.nn.parallel.DistributedDataParallel(trainable, find_unused_parameters=several_sources)


class Source:
    """One training set of a stage: its name (what training_step is told), dataset, BatchPlan, collator,
    and the data files it was read from (for the model card)."""

    def __init__(self, name, dataset, plan, collate, files=()):
        self.name, self.dataset, self.plan, self.collate, self.files = name, dataset, plan, collate, list(files)

    def loader(self, epoch, start_batch, num_workers=0, pin_memory=False):
        """The batches of ``epoch`` from ``start_batch`` on, in BatchPlan's order."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=list(self.plan.batches(epoch, start_batch)), collate_fn=self.collate,
            num_workers=num_workers, pin_memory=pin_memory,
            generator=torch.Generator())  # its own generator: the global RNG stays untouched


def interleave(sizes, rule="proportional"):
    """The source index of every step of one epoch, given each source's batches per pass.
    proportional: round-robin where each step takes the source with the smallest (done + 1) / size; ties go
    to the earlier source, so a smaller source is spread evenly through a larger one, and an epoch is one
    pass over every source. With one source this is simply its batches in order.
    paired: sentence-transformers' fit with several objectives (jhgan's multitask recipe): min(sizes)
    rounds of one batch of each source in order, so an epoch is one pass over the smallest source; the
    others carry on where they stopped in the next epoch (see stage_batches)."""
    if rule == "paired":
        return [i for _ in range(min(sizes)) for i in range(len(sizes))]
    done, order = [0] * len(sizes), []
    for _ in range(sum(sizes)):
        i = min((k for k in range(len(sizes)) if done[k] < sizes[k]), key=lambda k: ((done[k] + 1) / sizes[k], k))
        done[i] += 1
        order.append(i)
    return order


def stage_batches(sources, schedule, step, total_steps, num_workers=0, pin_memory=False):
    """(epoch, source, batch) for every step from ``step`` to ``total_steps``: epoch after epoch, each
    taking the sources' batches in the order of ``schedule`` (see interleave). A source reads its batches
    pass after pass (its pass k is BatchPlan epoch k), across the stage's epochs: a proportional epoch is
    one pass of every source; in a paired one the longer sources carry on where they stopped, as
    sentence-transformers' fit keeps their iterators. Where each source stands follows from ``step``."""
    epoch, offset = divmod(step, len(schedule))
    taken = [epoch * schedule.count(i) + schedule[:offset].count(i) for i in range(len(sources))]
    loaders = [None] * len(sources)
    while step < total_steps:
        for index in schedule[offset:]:
            if step >= total_steps:
                return
            turn, position = divmod(taken[index], len(sources[index].plan))
            if loaders[index] is None or position == 0:
                loaders[index] = iter(sources[index].loader(turn, position, num_workers, pin_memory))
            yield epoch, sources[index], next(loaders[index])
            taken[index] += 1
            step += 1
        epoch, offset = epoch + 1, 0


def autocast_dtype(args):
    """The mixed-precision dtype of --fp16 / --bf16, or None (full precision)."""
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def describe_stage(args, stage, sources, world, total_steps, steps_per_epoch):
    sizes = ", ".join(f"{s.name} {len(s.dataset):,} examples / {len(s.plan):,} batches"
                      + (f" (a batch of {s.plan.requested:,} asked for, more than there are: batches of "
                         f"{s.plan.global_batch:,})" if s.plan.requested > s.plan.global_batch else "")
                      for s in sources)
    return (f"[{stage.name}] {sizes}; batch {args.batch_size}"
            + (f" ({world} processes x {sources[0].plan.local_batch})" if world > 1 else "")
            + f", {total_steps:,} steps ({steps_per_epoch:,} per epoch), eval every {args.eval_steps} on {args.dev_file}")


def build_optimizer(model, lr, weight_decay):
    """AdamW; no weight decay on biases and LayerNorm weights. Fused (one kernel for all parameters):
    much faster than the default on CPU for a large embedding table."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
