"""The README.md of a saved model folder: sentence-transformers' card layout with the training recipe
and every evaluation row recorded so far."""
import json
import os
import sys

from .files import save_atomic, save_json_atomic
from .sts import METRICS


DATASET_NAMES = {"korsts-test": "KorSTS test", "korsts-dev": "KorSTS dev", "klue-sts-dev": "KLUE-STS dev"}


HUB_DATASETS = {"KorNLI": "kakaobrain/kor-nli", "KorSTS": "kakaobrain/kor-sts", "KLUE": "klue/klue",
                "wiki": "wikipedia"}


def _pooling(folder):
    path = os.path.join(folder, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "unknown"
    with open(path) as f:
        cfg = json.load(f)
    return "cls" if cfg.get("pooling_mode_cls_token") else "mean" if cfg.get("pooling_mode_mean_tokens") else "other"


# Encoder-decoder families whose sentence encoder is the encoder alone: AutoModel would build the whole
# model (with a decoder, random if the folder holds only the encoder) and its call needs decoder inputs.
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _encoder_class(folder):
    """The transformers class the card's plain-transformers usage code loads the folder with."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return ENCODER_CLASSES.get(model_type, "AutoModel")


def write_model_card(folder, rows=()):
    """README.md of a saved model folder in the sentence-transformers card layout: YAML front matter
    (library, pipeline tag, language, base model, datasets, metrics, model-index), then how it was trained,
    its pooling, the 8-metric rows of ``rows`` (evaluation.py's JSON rows; merged with those of earlier
    calls, kept in eval_results.json) and usage with sentence-transformers and plain transformers. Both files are
    written atomically (files.save_atomic): a failed write raises its OSError and leaves the earlier file whole."""
    results_path = os.path.join(folder, "eval_results.json")
    kept = []
    if os.path.isfile(results_path):
        try:
            with open(results_path, encoding="utf-8") as f:
                kept = json.load(f)
            if not isinstance(kept, list):
                raise ValueError("not a list of rows")
        except ValueError as e:  # torn by an older version's in-place write: kept aside, not crashed on
            os.replace(results_path, results_path + ".corrupt")
            print(f"warning: {results_path} was not readable ({e}); moved to {results_path}.corrupt and started "
                  f"again with these rows", file=sys.stderr)
            kept = []
    new = {(r["dataset"], r["protocol"]) for r in rows}
    rows = sorted([r for r in kept if (r["dataset"], r["protocol"]) not in new] + list(rows),
                  key=lambda r: (r["dataset"], r["protocol"]))
    earlier = open(results_path, "rb").read() if os.path.isfile(results_path) else None
    save_json_atomic(results_path, rows)  # a failed write leaves the earlier rows readable
    info_path = os.path.join(folder, "training.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    pooling = _pooling(folder)
    datasets = sorted({hub for name in info.get("train_files", []) for key, hub in HUB_DATASETS.items()
                       if key in name} | {"kakaobrain/kor-sts"} | ({"klue/klue"} if any(
                           r["dataset"].startswith("klue") for r in rows) else set()))
    yaml = ["---", "language:", "- ko", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
            "tags:", "- sentence-transformers", "- feature-extraction", "- sentence-similarity", "- korean",
            f"- {info.get('method', 'korean-sentence-embeddings').lower()}"]
    if info.get("base_model") and not os.path.isabs(info["base_model"]):
        yaml.append(f"base_model: {info['base_model']}")
    yaml += ["datasets:"] + [f"- {d}" for d in datasets]
    yaml += ["metrics:"] + [f"- {m.split('_')[1]}_{m.split('_')[0]}" for m in METRICS]
    if rows:
        yaml += ["model-index:", f"- name: {info.get('method', 'model').lower()}-{info.get('mode') or 'model'}",
                 "  results:"]
        for r in rows:
            yaml += ["  - task:", "      type: semantic-similarity", "      name: Semantic Similarity",
                     "    dataset:", f"      name: {DATASET_NAMES.get(r['dataset'], r['dataset'])} ({r['protocol']})",
                     f"      type: {r['dataset']}", "    metrics:"]
            yaml += [f"    - type: {m.split('_')[1]}_{m.split('_')[0]}\n      value: {r['metrics'][m]:.4f}"
                     for m in METRICS]
    yaml.append("---")
    how = {"cls": "the [CLS] token's last hidden state (`last_hidden_state[:, 0]`)",
           "mean": "the mean of the token vectors over the attention mask"}.get(pooling, "see modules.json")
    body = [f"# {info.get('method', 'Korean sentence embedding')} {info.get('mode') or ''}".rstrip(), "",
            f"A Korean sentence-embedding model trained with {info.get('method', 'this toolkit')}"
            + (f" (`--mode {info['mode']}`)" if info.get("mode") else "")
            + (f" from `{info['base_model']}`" if info.get("base_model") else "") + ".", "",
            f"**Pooling: {pooling}** -- the sentence vector is {how}. `SentenceTransformer` reads this from "
            "`modules.json`; with plain `transformers`, pool the same way (below), or the embeddings will be wrong.",
            ""]
    if info:
        body += ["## Training", "", f"- data: {', '.join(info['train_files']) or '-'}",
                 f"- checkpoint selected on {info['dev_file']} ({info['dev_protocol']} protocol) at step "
                 f"{info['step']} of stage {info['stage']}", "", "```bash", info["command"], "```", ""]
    if info.get("merge"):
        merge = info["merge"]
        body += ["## Merge", "", f"Merged with its base, every parameter (1 - {merge['alpha']:g}) x base + "
                 f"{merge['alpha']:g} x fine-tuned (`utils/merge.py`): base `{merge['base']}`, fine-tuned "
                 f"`{merge['finetuned']}`" + (f"; {merge['dense_head']}" if merge.get("dense_head") else "") + ".", ""]
    body += ["## Results (x100)", ""]
    if rows:
        body += ["| dataset | protocol | AVG | " + " | ".join(METRICS) + " |",
                 "|---|---|---:|" + "---:|" * len(METRICS)]
        body += [f"| {DATASET_NAMES.get(r['dataset'], r['dataset'])} | {r['protocol']} | {r['metrics']['avg']:.2f} | "
                 + " | ".join(f"{r['metrics'][m]:.2f}" for m in METRICS) + " |" for r in rows]
        body += ["", "standard: correlations over the whole set; bmk: BM-K's mean over shuffled batches.", ""]
    else:
        body += ["Not evaluated yet: `python <method>/evaluation.py --model_dir <this folder> --dataset korsts-test "
                 "korsts-dev klue-sts-dev --protocol standard bmk --output_json results.json` fills this in.", ""]
    model_class = _encoder_class(folder)
    pool_code = ("embeddings = out.last_hidden_state[:, 0]" if pooling == "cls" else
                 "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
                 "    embeddings = (out.last_hidden_state * mask).sum(1) / mask.sum(1)")
    body += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             "model = SentenceTransformer('path/to/this/folder')  # backend='onnx': pip install sentence-transformers[onnx]",
             "embeddings = model.encode(['한 남자가 음식을 먹는다.', '한 남자가 빵 한 조각을 먹는다.'])",
             "print(model.similarity(embeddings, embeddings))", "```", "", "```python", "import torch",
             f"from transformers import {model_class}, AutoTokenizer", "",
             "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')",
             f"model = {model_class}.from_pretrained('path/to/this/folder')",
             "batch = tokenizer(['한 남자가 음식을 먹는다.'], padding=True, truncation=True, return_tensors='pt')",
             "with torch.no_grad():", "    out = model(**batch)", f"    {pool_code}", "```", ""]
    if os.path.isdir(os.path.join(folder, "2_Dense")):
        body.insert(body.index("## Usage") + 1, "This folder also has a Dense layer after pooling (2_Dense): "
                    "use sentence-transformers, which applies it.\n")
    card = "\n".join(yaml + [""] + body).encode("utf-8")
    try:
        save_atomic(os.path.join(folder, "README.md"), lambda f: f.write(card))
    except OSError:  # the card stays as it was: so do its rows
        try:
            if earlier is None:
                os.remove(results_path)
            else:
                save_atomic(results_path, lambda f: f.write(earlier))
        except OSError:
            pass
        raise
