"""Dev selection and what a saved model records: the dev evaluator (the 8 STS metrics of the live model),
the best model of a stage, and the saved folder's training.json, prompts and model card."""
import json
import math
import os
import shlex

import numpy as np
import torch.distributed as dist

from .checkpoint import save_atomically
from .data import TokenizedTexts, read_sts, resolve_path
from .encoding import encode_tokenized, update_st_config
from .files import save_json_atomic
from .model_card import write_model_card
from .sts import bmk_metrics, sts_metrics

METHOD = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the method folder's name


def model_max_len(tokenizer, model):
    """The longest input ``model`` takes (its position table, its tokenizer's limit, else 512): evaluation
    and saved models use it, so that no benchmark sentence is cut because training used a short --max_len."""
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    limits = [tokenizer.model_max_length] if 0 < tokenizer.model_max_length < 100_000 else []
    positions = getattr(config, "max_position_embeddings", None)
    if positions:  # RoBERTa-style position ids start after the padding index
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(positions - offset)
    return min(limits) if limits else 512


class DevEvaluator:
    """The 8 metrics of the live model on one STS set (--dev_file), tokenised once and never truncated
    below the model's own limit; ``protocol`` "bmk" averages them over shuffled batches of ``bmk_batch``
    pairs (BM-K's selection score), "standard" computes them over the whole set."""

    def __init__(self, dev_file, data_dir, tokenizer, max_len, batch_size, device, amp_dtype, protocol="standard",
                 bmk_batch=256, seed=42, log=print, prefix=""):
        path = resolve_path(dev_file, data_dir)
        self.pairs = read_sts(path)
        self.tokenized = TokenizedTexts(tokenizer, [p[0] for p in self.pairs] + [p[1] for p in self.pairs], max_len,
                                        prefix=prefix)
        log(f"{path}: {len(self.pairs):,} dev pairs, {self.tokenized.num_truncated} of {len(self.tokenized):,} "
            f"sentences truncated at {max_len} tokens")
        self.gold = np.array([p[2] for p in self.pairs])
        self.pad_id, self.batch_size, self.device, self.amp_dtype = tokenizer.pad_token_id, batch_size, device, amp_dtype
        self.protocol, self.bmk_batch, self.seed = protocol, bmk_batch, seed

    def __call__(self, model):
        model.eval()
        emb = encode_tokenized(model, self.tokenized, self.pad_id, self.batch_size, self.device,
                               amp_dtype=self.amp_dtype)
        model.train()
        n = len(self.pairs)
        if self.protocol == "bmk":
            return bmk_metrics(emb[:n], emb[n:], self.gold, self.bmk_batch, self.seed)
        return sts_metrics(emb[:n], emb[n:], self.gold)


def training_command(args):
    """The command line that reproduces a run (every flag of args.json, defaults included)."""
    skip = ("resume", "data_fingerprints", "eval_max_len", "output_dir", "overwrite_output_dir", "device", "num_workers", "decontamination")
    parts = [f"python {METHOD}/train.py"]
    for key, value in vars(args).items():
        if key in skip or value is None or value is False or value == "":
            continue
        flag = f"--{key}"
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " \\\n    ".join(parts)


def write_training_info(folder, args, stage, step, dev_metrics, files):
    """best_model/training.json: what the model card says about training (method, base model, data files,
    command, the dev score it was selected by)."""
    info = {"method": METHOD, "mode": getattr(args, "mode", None), "stage": stage, "step": step,
            "base_model": args.model, "train_files": files, "dev_file": args.dev_file,
            "dev_protocol": args.dev_protocol, "dev_metrics": dev_metrics, "command": training_command(args),
            "decontamination": getattr(args, "decontamination", None)}
    with open(os.path.join(folder, "training.json"), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def cap_saved_tokenizer(folder, max_len):
    """Set the saved tokenizer's model_max_length to the model's ``max_len`` (its max_seq_length): the source's
    may say 4096 or 1e30, and then ``tokenizer(text, truncation=True)`` in plain transformers (the model
    card's usage code) would not stop where the position table ends."""
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["model_max_length"] = int(max_len)
        save_json_atomic(path, config)


def save_model(encoder, folder, tokenizer, args, stage, step, dev_metrics, files=()):
    """The encoder as a Hugging Face + sentence-transformers folder (max_seq_length: the model's own limit),
    with training.json and a model card (evaluation.write_model_card) that carries the dev row it was
    selected by; ``files``: the training data files, for the card."""
    encoder.save(folder, tokenizer, args.eval_max_len)
    cap_saved_tokenizer(folder, args.eval_max_len)
    prompts = {name: prefix for name, prefix in (("query", args.query_prefix), ("passage", args.passage_prefix))
               if prefix}
    if prompts:  # trained with them: evaluation.py and SentenceTransformer.encode(prompt_name=...) apply them
        update_st_config(folder, prompts=prompts, default_prompt_name=None)
    write_training_info(folder, args, stage, step, dev_metrics, list(files))
    dev_row = {"dataset": args.dev_file, "protocol": args.dev_protocol, "metrics": dev_metrics} if dev_metrics else None
    write_model_card(folder, [dev_row] if dev_row else [])


def best_score_text(score):
    return "none yet" if score == -math.inf else f"{score:.2f}"


class BestModel:
    """The best dev model of one stage, kept by rank 0 in output_dir/<stage.best_dir> (a no-op elsewhere).
    ``evaluate`` logs the dev metrics of ``encoder`` and saves it when its max Spearman beats ``score``,
    the best so far; ``finish`` saves the final model when no dev score was a number (constant embeddings),
    so a stage always leaves a model."""

    def __init__(self, args, stage, encoder, tokenizer, evaluate, log, score, sources, rank, stale=0):
        self.args, self.stage, self.encoder, self.tokenizer = args, stage, encoder, tokenizer
        self.dev, self.log = evaluate, log
        self.score, self.main = score, rank == 0
        self.stale = stale  # evaluations since the best one (rank 0), for --early_stop_evals
        self.dir = os.path.join(args.output_dir, stage.best_dir)
        self.files = [f for s in sources for f in s.files]  # for the model card

    def evaluate(self, step, epoch):
        if not self.main:
            return
        metrics = self.dev(self.encoder)
        self.log.record({"stage": self.stage.name, "step": step, "epoch": epoch, "dev": metrics})
        self.log(f"[{self.stage.name}] step {step}: dev avg {metrics['avg']:.2f}, cosine spearman "
                 f"{metrics['cosine_spearman']:.2f}, max spearman {metrics['max_spearman']:.2f}")
        self.stale += 1
        if metrics["max_spearman"] > self.score:
            self.score, self.stale = metrics["max_spearman"], 0
            self.save(step, metrics)
            self.log(f"\t## SAVE {self.dir} | valid_score: {self.score / 100:.4f} | epochs: {epoch} | steps: {step} ##")

    def stop_early(self):
        """True, on every process, once --early_stop_evals N evaluations in a row have not beaten the best
        score (BM-K's rule: a counter reset by every improvement, the run ends when it reaches N)."""
        stop = [0 < self.args.early_stop_evals <= self.stale]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(stop, src=0)  # only rank 0 evaluates
        return stop[0]

    def save(self, step, metrics):
        save_atomically(lambda d: save_model(self.encoder, d, self.tokenizer, self.args, self.stage.name, step, metrics,
                                             self.files), self.dir)

    def finish(self, step):
        if self.main and not os.path.isdir(self.dir):  # every dev score was NaN
            self.save(step, None)
            self.log(f"warning: no dev score was a number; saved the final model to {self.dir}")
