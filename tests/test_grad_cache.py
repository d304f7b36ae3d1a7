"""Gradient caching (--mini_batch_size): the step of a big contrastive batch computed chunk by chunk equals
the plain step, loss and every gradient, in one process and under DDP, and the re-encoding in backward
replays the dropout masks of the first pass."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, torchrun


def triplet_batch(B=8, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3 * B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 4:] = torch.randint(0, 2, (3 * B, L - 4), generator=g)
    mask[:, 4:] = mask[:, 4:].cummin(dim=1).values  # right padding
    return {"input_ids": ids * mask, "attention_mask": mask}


def step(method, model, batch, mode="sup"):
    args = type("Args", (), {"temperature": 0.05})()
    model.zero_grad(set_to_none=True)
    loss, _ = method.train.training_step(model, mode, batch, args, world=1)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a, b, tol=1e-5):
    assert b[0] == pytest.approx(a[0], abs=1e-6)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    worst = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    assert worst < tol, worst


@pytest.mark.slow
@pytest.mark.parametrize("mode, mini", [("sup", 5), ("sup", 8), ("unsup", 3)])
def test_cached_step_equals_uncached_step(kosimcse, tiny_bert_no_dropout, mode, mini):
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert_no_dropout, pooler="cls").train()
    batch = triplet_batch()
    if mode == "unsup":
        batch = {k: v[:16] for k, v in batch.items()}
    plain = step(kosimcse, model, batch, mode)
    model.mini_batch_size = mini
    assert_same_step(plain, step(kosimcse, model, batch, mode))


def test_cached_step_equals_uncached_step_t5(kosentencet5, tiny_t5):
    model = kosentencet5.model.SentenceT5.from_pretrained(tiny_t5, st5_head=True).eval()  # eval: no dropout
    batch = triplet_batch()
    plain = step(kosentencet5, model, batch)
    model.mini_batch_size = 4
    assert_same_step(plain, step(kosentencet5, model, batch))


def test_cached_step_replays_the_dropout_masks(kosimcse, tiny_bert):
    """With dropout on, the cached gradient is the gradient of the loss that was computed: it equals the
    plain backward of the same chunks encoded one after the other (the same RNG stream, so the same
    masks). A different seed gives another loss, so the masks matter here."""
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean").train()
    batch, mini = triplet_batch(), 6

    model.mini_batch_size = mini
    torch.manual_seed(7)
    cached = step(kosimcse, model, batch)

    model.mini_batch_size = 0
    def chunked_forward(input_ids, attention_mask):  # the chunks one after the other, no checkpointing
        return torch.cat([model.encode_padded(input_ids[i:i + mini], attention_mask[i:i + mini])
                          for i in range(0, len(input_ids), mini)])
    model.forward = chunked_forward
    torch.manual_seed(7)
    reference = step(kosimcse, model, batch)
    torch.manual_seed(8)
    other_seed = step(kosimcse, model, batch)
    del model.forward
    assert_same_step(reference, cached)
    assert other_seed[0] != pytest.approx(reference[0], abs=1e-4)


@pytest.mark.slow
def test_cached_ddp_step_equals_single_process_uncached(tiny_bert_no_dropout, tmp_path):
    script = os.path.join(ROOT, "tests", "scripts", "ddp_step.py")
    method = os.path.join(ROOT, "KoSimCSE")
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, script, method, tiny_bert_no_dropout, single], check=True, capture_output=True)
    run = torchrun(script, method, tiny_bert_no_dropout, double, "5")  # 2 ranks x 12 sentences, chunks of 5
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(single), torch.load(double)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 20
    worst = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    assert worst < 1e-5, worst
