"""Merge a fine-tuned model with its base, parameter by parameter (WiSE-FT's linear interpolation; LM-Cocktail's
weighted average of two models):

    python utils/merge.py FINETUNED BASE --alpha 0.3 0.5 0.7 --output_dir OUT

writes one folder per weight, OUT/alpha-<A>/, with every parameter theta = (1 - A) * theta_base + A * theta_tuned:
A = 1 is the fine-tuned model, A = 0 the base, exactly. Each folder is the fine-tuned folder with merged weights:
its pooling (1_Pooling, modules.json), prompts, tokenizer and max length are kept (a mean-pooled model stays mean
pooled), and the merge is recorded in training.json ("merge") and in the model card. A Dense head after pooling
(2_Dense) is the backbone's pooler when the fine-tuned folder's head equals its own pooler weights: it is then
written from the merged pooler; any other head (KoSentenceT5's ST5 projection) has no counterpart in a base
model and is kept as fine-tuned (said on stdout and in the card).

Choosing A is model selection: do it on dev sets only, e.g. KorSTS dev and a retrieval dev split such as
data/make_ict.py's (utils/real_table.py's merged rows do), never on a test set.

FINETUNED is a saved model folder of this toolkit (or any sentence-transformers folder with a Hugging Face model
at its top level); BASE is a model folder or hub id of the same architecture (same parameter names and shapes;
the class is the one in FINETUNED's config.json, so a base saved with a head, e.g. BertForPreTraining, loads
its encoder). A folder already merged from the same two models at the same A is kept (a rerun resumes);
each folder is written under a temporary name and renamed into place when complete.
"""
import argparse
import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
from common.files import fsync_dir, save_json_atomic  # noqa: E402
from common.model_card import write_model_card  # noqa: E402

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class MergeError(Exception):
    """A bad input, reported as one line."""


def folder_name(alpha):
    return f"alpha-{alpha:g}"


def load_encoder(path, cls_name, what):
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()  # a merge prints one line per folder, errors one line
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise MergeError(f"{what} {path}: config.json names architecture {cls_name!r}, which transformers "
                         f"{transformers.__version__} does not have")
    try:
        return cls.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot load {what} {path!r} as {cls_name}: {' '.join(str(e).split())}") from None


def architecture(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MergeError(f"{folder}: no config.json (FINETUNED must be a saved model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise MergeError(f"{path}: not JSON ({e})") from None
    names = config.get("architectures") or []
    if not names:
        raise MergeError(f"{path}: no \"architectures\" entry, so the model class is unknown")
    return names[0]


def check_same_architecture(tuned_state, base_state, finetuned, base):
    """One line naming the first difference: a parameter only one model has, or a shape that differs."""
    only_tuned = sorted(set(tuned_state) - set(base_state))
    only_base = sorted(set(base_state) - set(tuned_state))
    if only_tuned or only_base:
        name, owner = (only_tuned[0], finetuned) if only_tuned else (only_base[0], base)
        raise MergeError(f"{finetuned} and {base} are different architectures: {name} is only in {owner} "
                         f"({len(only_tuned)} parameters only in FINETUNED, {len(only_base)} only in BASE)")
    for name, tensor in tuned_state.items():
        if tensor.shape != base_state[name].shape:
            raise MergeError(f"{finetuned} and {base} are different architectures: {name} is "
                             f"{tuple(tensor.shape)} in FINETUNED and {tuple(base_state[name].shape)} in BASE")


def interpolate(tuned_state, base_state, alpha):
    """{name: (1 - alpha) * base + alpha * tuned}, computed in float32 (both models are loaded in float32, so the
    merged folder holds float32 weights); integer buffers (position ids) must be equal and are kept."""
    import torch
    merged = {}
    for name, tuned in tuned_state.items():
        base = base_state[name]
        if not tuned.is_floating_point():
            if not torch.equal(tuned, base):
                raise MergeError(f"integer buffer {name} differs between the two models: they cannot be merged")
            merged[name] = tuned.clone()
            continue
        merged[name] = ((1.0 - alpha) * base.float() + alpha * tuned.float()).to(tuned.dtype)
    return merged


def dense_head(finetuned, tuned_state):
    """("pooler", None) when 2_Dense is the backbone's pooler.dense (rewrite it from the merged pooler), ("kept",
    reason) for a head of its own, (None, None) without one."""
    path = os.path.join(finetuned, "2_Dense", "model.safetensors")
    if not os.path.isdir(os.path.join(finetuned, "2_Dense")):
        return None, None
    import torch
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        return "kept", "2_Dense has no model.safetensors"
    head = load_file(path)
    pooler = {"linear.weight": tuned_state.get("pooler.dense.weight"), "linear.bias": tuned_state.get("pooler.dense.bias")}
    if all(pooler[k] is not None and k in head and torch.equal(head[k].float(), pooler[k].float()) for k in pooler):
        return "pooler", None
    return "kept", "the 2_Dense head after pooling has no counterpart in the base model: kept as fine-tuned"


def write_merged(finetuned, base, alpha, out_dir, model, merged, head):
    """OUT/alpha-A/: the fine-tuned folder's files, the merged weights, the merge recorded; atomic rename."""
    from safetensors.torch import save_file
    final = os.path.join(out_dir, folder_name(alpha))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(finetuned, tmp, ignore=lambda d, names: [n for n in names if n in WEIGHT_FILES and
                                                             os.path.samefile(d, finetuned)])
    model.load_state_dict(merged)
    model.save_pretrained(tmp)
    if head[0] == "pooler":
        save_file({"linear.weight": merged["pooler.dense.weight"].float().contiguous(),
                   "linear.bias": merged["pooler.dense.bias"].float().contiguous()},
                  os.path.join(tmp, "2_Dense", "model.safetensors"))
    info_path = os.path.join(tmp, "training.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    info["merge"] = {"method": "linear", "alpha": alpha, "finetuned": finetuned, "base": base,
                     "formula": "(1 - alpha) * base + alpha * finetuned, every parameter",
                     "dense_head": head[1] or ("merged (the backbone's pooler)" if head[0] == "pooler" else None)}
    save_json_atomic(info_path, info)
    for stale in ("eval_results.json",):  # the fine-tuned model's scores are not the merged model's
        if os.path.isfile(os.path.join(tmp, stale)):
            os.remove(os.path.join(tmp, stale))
    write_model_card(tmp, [])
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    return final


def already_merged(folder, finetuned, base, alpha):
    path = os.path.join(folder, "training.json")
    try:
        with open(path, encoding="utf-8") as f:
            merge = json.load(f).get("merge") or {}
    except (OSError, ValueError):
        return False
    return (merge.get("finetuned"), merge.get("base"), merge.get("alpha")) == (finetuned, base, alpha)


def merge(finetuned, base, alphas, out_dir, overwrite=False, log=print):
    """The merged folders, one per alpha (see the module docstring); returns their paths."""
    import torch
    finetuned = os.path.abspath(finetuned)
    base = os.path.abspath(base) if os.path.isdir(base) else base
    todo = []
    for alpha in alphas:
        folder = os.path.join(out_dir, folder_name(alpha))
        if os.path.isdir(folder) and already_merged(folder, finetuned, base, alpha):
            log(f"{folder}: already merged from these models, kept")
        elif os.path.exists(folder) and not overwrite:
            raise MergeError(f"{folder} exists and is not a merge of {finetuned} and {base} at alpha {alpha:g}: "
                             f"remove it or pass --overwrite")
        else:
            todo.append(alpha)
    if todo:
        cls_name = architecture(finetuned)
        model = load_encoder(finetuned, cls_name, "FINETUNED")
        tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        base_model = load_encoder(base, cls_name, "BASE")
        base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        del base_model
        check_same_architecture(tuned_state, base_state, finetuned, base)
        head = dense_head(finetuned, tuned_state)
        if head[0] == "kept":
            log(f"note: {head[1]}")
        os.makedirs(out_dir, exist_ok=True)
        with torch.no_grad():
            for alpha in todo:
                path = write_merged(finetuned, base, alpha, out_dir, model, interpolate(tuned_state, base_state, alpha),
                                    head)
                log(f"{path}: (1 - {alpha:g}) x base + {alpha:g} x fine-tuned")
    return [os.path.join(out_dir, folder_name(a)) for a in alphas]


def alpha_value(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text}: must be a number in [0, 1] (0 = the base, 1 = the fine-tuned model)")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("finetuned", help="the fine-tuned model folder (its pooling, prompts and card are kept)")
    p.add_argument("base", help="the base model: a folder or hub id of the same architecture")
    p.add_argument("--alpha", type=alpha_value, nargs="+", required=True,
                   help="weights of the fine-tuned model, each in [0, 1]: one output folder per value")
    p.add_argument("--output_dir", required=True, help="OUT: the merged models go to OUT/alpha-<A>/")
    p.add_argument("--overwrite", action="store_true", help="replace folders of OUT that hold something else")
    args = p.parse_args(argv)
    if len(set(args.alpha)) != len(args.alpha):
        p.error(f"--alpha {' '.join(f'{a:g}' for a in args.alpha)}: a value is given twice")
    if not os.path.isdir(args.finetuned):
        p.error(f"{args.finetuned}: no such folder")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.finetuned):
        p.error("--output_dir must not be the fine-tuned folder itself")
    try:
        merge(args.finetuned, args.base, args.alpha, args.output_dir, args.overwrite)
    except MergeError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk or a read-only OUT: finished alpha folders are whole (renamed into place)
        sys.exit(f"error: cannot write {e.filename or args.output_dir}: {e.strerror or e}")


if __name__ == "__main__":
    main()
