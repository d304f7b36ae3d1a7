"""Train and evaluate published rows of the seed tables over several seeds, and print the published
numbers beside ours (mean ± std over seeds) and the difference.

    python utils/paper_table.py --list
    python utils/paper_table.py --rows all --seeds 1 2 3 --data_dir data --out output/paper
    python utils/paper_table.py --rows bmk-kosimcse-bert bmk-kosbert-bert --seeds 1 2 3 --dry_run
    python utils/paper_table.py --rows bmk-kosimcse-bert bmk-kosbert-bert --seeds 1 --data_dir ../shared/data \\
        --out output/proxy --proxy /tmp/me5-small --max_steps 10

A row is a preset file <folder>/presets/<row>.args (every preset except the --mode defaults, named after
a mode, and the quick-* smoke presets); its published numbers are the rows of data/published_results.csv with that
row_id (a preset whose header says "# Published row: X" is a variant compared against X's numbers). A
published row whose note starts "not reproducible" (a number cited from another paper, with no recipe to
follow) has no preset: it is listed and shown with its published numbers, and never run. For
each row and seed it runs

    python <folder>/train.py @<folder>/presets/<row>.args --seed S --data_dir DIR
        --output_dir OUT/<row>/seed-S --overwrite_output_dir
    python <folder>/evaluation.py --model_dir OUT/<row>/seed-S/best_model --data_dir DIR
        --dataset korsts-test korsts-dev klue-sts-dev --protocol standard bmk --batch_size B
        --output_json OUT/<row>/seed-S/results.json

(B, the bmk protocol's batch: for rows whose source used BM-K's per-batch protocol his test batch, which
his test loop takes from --batch_size, i.e. the preset's --batch_size or its "# bmk eval batch: N" line;
256, BM-K's README test batch, for the others). korsts-dev is evaluated too, since KR-BERT-SimCSE's
numbers were published on it as well (it also selects the checkpoint). A run whose
results.json exists is skipped; one whose training finished is only evaluated; one killed mid-training
continues with train.py --resume. So a crashed table resumes where it stopped. Logs go to OUT/<row>/seed-S/{train,eval}.log. The table is printed and written to
OUT/paper_table.md and OUT/paper_table.json.

--proxy MODEL runs every row small (--max_steps N, batch 16, KLUE-NLI train when the KorNLI
train files are absent, 2,000 training examples) to check the wiring end to end: rows on a BERT-like
backbone run on MODEL; rows whose architecture has no local pretrained model (T5, BART, SKT KoBERT's
sentencepiece tokenizer, the DiffCSE encoder + generator) run on tiny random models built here from a
tokenizer trained on a few hundred wiki lines, and are labelled "wiring only". Proxy numbers are never
compared with the papers' (the published numbers are shown beside them as reference only). Under
--proxy, flags this tree's train.py does not have yet (NEW_FLAGS) are dropped, and --fp16 on a CPU.
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")
PUBLISHED_CSV = os.path.join(ROOT, "data", "published_results.csv")
METRICS = ("cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman",
           "manhattan_pearson", "manhattan_spearman", "dot_pearson", "dot_spearman")
SHORT = dict(zip(("avg",) + METRICS, ("AVG", "cosP", "cosS", "eucP", "eucS", "manP", "manS", "dotP", "dotS")))
BRIEF = ("avg", "cosine_pearson", "cosine_spearman")
DATASETS = ("korsts-test", "korsts-dev", "klue-sts-dev")  # evaluated for every run
SHOWN = ("korsts-test", "klue-sts-dev")  # shown for every row; korsts-dev where a number was published on it
PROTOCOLS = ("standard", "bmk")
TABLES = ("BM-K sup", "BM-K unsup", "KoSentenceBERT", "KR-BERT-SimCSE", "SimCSE-KO")
# Flags the presets use that main adds (KoSimCSE --mode multitask / sup_sts and the STS-stage flags, and
# --dev_protocol everywhere) and the generic ones the brief lists for every folder.
NEW_FLAGS = ("--sts_file", "--sts_batch_size", "--sts_epochs", "--sts_lr", "--dev_protocol", "--max_grad_norm",
             "--eval_steps", "--fp16", "--bf16")
NEW_MODES = ("multitask", "sup_sts")
# Not rows: the --mode default presets (presets/<mode>.args, named after a mode of some folder) and the
# quick-* smoke presets.
NON_ROWS = ("sup", "unsup", "multitask", "sup_sts", "pairs", "pairs_sts", "nli", "sts", "nli_sts")
NOT_REPRODUCIBLE = "not reproducible"  # how the note of a published row with no recipe (and no preset) starts
PROXY_BATCH, PROXY_SAMPLES = 16, 2000
PROXY_DEV, PROXY_DATASETS = "klue-sts-dev", ("korsts-test",)  # --proxy: a small dev set, test on KorSTS only
BMK_TEST_BATCH = 256  # BM-K's KoSimCSE README test command; used where the source's own test batch is unknown
PROXY_NLI = ("KLUE-NLI/klue_nli_train.tsv",)  # a training split: the XNLI and KLUE-NLI dev/test sets are MTEB's


# --- rows ------------------------------------------------------------------------------------------

def preset_tokens(path):
    """The flags of a preset file, read as flags.PresetParser reads them (# starts a comment)."""
    with open(path, encoding="utf-8") as f:
        return [tok for line in f for tok in line.split("#", 1)[0].split()]


def flag_values(tokens, flag):
    """The values after the last ``flag`` in ``tokens`` ([] if absent; [] for a bare switch)."""
    values = None
    for i, tok in enumerate(tokens):
        if tok == flag:
            values = []
            for value in tokens[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
    return values if values is not None else []


def drop_flags(tokens, flags):
    """``tokens`` without every occurrence of ``flags`` and their values."""
    out, skipping = [], False
    for tok in tokens:
        if tok.startswith("--"):
            skipping = tok in flags
        if not skipping:
            out.append(tok)
    return out


def read_published(path=PUBLISHED_CSV):
    """{row_id: [csv row, ...]} with the numbers as floats (None where blank)."""
    published = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            for key in ("avg",) + METRICS:
                row[key] = float(row[key]) if row[key].strip() else None
            published.setdefault(row["row_id"], []).append(row)
    return published


class Row:
    """One table row: a preset file (or, when ``preset`` is None, a published row with no preset yet)."""

    def __init__(self, row_id, folder, preset, published):
        self.id, self.folder, self.preset = row_id, folder, preset
        header = self._header()
        match = re.search(r"^#\s*Published row:\s*(\S+)", header, re.M)
        self.published_id = match.group(1) if match else row_id
        self.published = published.get(self.published_id, [])
        self.table = self.published[0]["table"] if self.published else "other"
        self.stand_in = "STAND-IN" in header
        # A published row cited from elsewhere with no recipe to follow: its note starts "not reproducible".
        self.not_reproducible = preset is None and any(
            (p["note"] or "").startswith(NOT_REPRODUCIBLE) for p in self.published)
        self.tokens = preset_tokens(preset) if preset else []
        match = re.search(r"^#\s*bmk eval batch:\s*(\d+)", header, re.M)
        batch = flag_values(self.tokens, "--batch_size")
        per_batch = any(p["protocol"] == "bmk" for p in self.published)
        self.bmk_batch = int(match.group(1)) if match else int(batch[0]) if batch and per_batch else BMK_TEST_BATCH

    def _header(self):
        if not self.preset:
            return ""
        with open(self.preset, encoding="utf-8") as f:
            return "".join(line for line in f if line.startswith("#"))

    @property
    def kind(self):
        """What a proxy run trains: 'pretrained' (the --proxy model) or a tiny model: t5, bart, skt, diffcse."""
        if self.folder == "KoDiffCSE":
            return "diffcse"
        if self.folder == "KoSentenceT5":
            return "bart" if flag_values(self.tokens, "--arch") == ["bart"] else "t5"
        if "skt/kobert" in " ".join(flag_values(self.tokens, "--model")):
            return "skt"
        return "pretrained"

    def labels(self):
        out = []
        if self.published_id != self.id:
            out.append(f"variant of {self.published_id}")
        if self.stand_in:
            out.append("stand-in backbone")
        return out


def discover_rows(root=ROOT, published=None):
    """Every row: the preset files of the method folders, then the published rows without a preset."""
    published = read_published() if published is None else published
    rows = []
    for folder in FOLDERS:
        presets = os.path.join(root, folder, "presets")
        if not os.path.isdir(presets):
            continue
        for name in sorted(os.listdir(presets)):
            stem = name[:-len(".args")]
            if name.endswith(".args") and stem not in NON_ROWS and not stem.startswith(("quick", "real-")):
                rows.append(Row(stem, folder, os.path.join(presets, name), published))
    have = {r.id for r in rows}
    for row_id, entries in published.items():
        if row_id not in have:
            rows.append(Row(row_id, entries[0]["folder"], None, published))
    order = {row_id: i for i, row_id in enumerate(published)}  # the CSV's order, variants after their row
    rows.sort(key=lambda r: ((TABLES + ("other",)).index(r.table), order.get(r.published_id, len(order)),
                             r.published_id != r.id, r.id))
    ids = [r.id for r in rows]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise SystemExit(f"error: row ids used by more than one method folder: {', '.join(duplicated)}")
    return rows


def select_rows(rows, wanted):
    if wanted == ["all"]:
        return [r for r in rows if r.preset]
    by_id = {r.id: r for r in rows}
    by_id.update({f"{r.folder}/{r.id}": r for r in rows})
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; see --list")
    return [by_id[w] for w in wanted]


# --- commands --------------------------------------------------------------------------------------

def rel(path):
    """``path`` relative to the working directory when it is inside it (shorter commands)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


_supported = {}


def supported(folder):
    """(flags, --mode choices) this tree's <folder>/train.py accepts, read from its --help."""
    if folder not in _supported:
        out = subprocess.run([sys.executable, os.path.join(ROOT, folder, "train.py"), "--help"],
                             capture_output=True, text=True).stdout
        modes = re.search(r"--mode \{([^}]*)\}", out)
        flags = set(re.findall(r"--[a-z_0-9-]+", out))
        _supported[folder] = (flags, set(modes.group(1).split(",")) if modes else set())
    return _supported[folder]


def missing_features(row):
    """The NEW_FLAGS / NEW_MODES the row's preset uses and this tree's train.py lacks."""
    flags, modes = supported(row.folder)
    missing = [f for f in NEW_FLAGS if f in row.tokens and f not in flags]
    missing += [f"--mode {m}" for m in flag_values(row.tokens, "--mode") if m in NEW_MODES and m not in modes]
    return missing


class Plan:
    """The commands of a table run."""

    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.proxy_dir = os.path.join(args.out, "_proxy_models")

    def run_dir(self, row, seed):
        return os.path.join(self.out, row.id, f"seed-{seed}")

    def proxy_model(self, kind):
        return self.args.proxy if kind == "pretrained" else os.path.join(self.proxy_dir, kind)

    def skip_reason(self, row):
        """Why ``row`` cannot run (None if it can)."""
        if row.preset is None:
            return "not reproducible: no recipe published" if row.not_reproducible else "no preset file yet"
        if self.args.proxy:
            modes = [m for m in missing_features(row) if m.startswith("--mode")]
            if modes:
                return f"this tree's {row.folder}/train.py lacks {', '.join(modes)} (added on main)"
        return None

    def train_command(self, row, seed):
        args, run_dir = self.args, self.run_dir(row, seed)
        script = rel(os.path.join(ROOT, row.folder, "train.py"))
        preset = ["@" + rel(row.preset)]
        extra, dropped = [], []
        if args.proxy:
            drop = [f for f in missing_features(row) if not f.startswith("--mode")]
            if "--fp16" in row.tokens and self.device() == "cpu":
                drop.append("--fp16")
            if drop:  # the preset's flags written out, without the ones this machine or tree cannot take
                preset, dropped = drop_flags(row.tokens, drop), drop
            extra += self.proxy_flags(row)
        if args.device:
            extra += ["--device", args.device]
        command = [sys.executable, script, *preset, "--seed", str(seed), "--data_dir", args.data_dir,
                   "--output_dir", run_dir, "--overwrite_output_dir", *extra]
        return command, dropped

    def proxy_flags(self, row):
        args, kind = self.args, row.kind
        flags = ["--model", self.proxy_model(kind), "--max_steps", str(args.max_steps),
                 "--eval_steps", str(args.max_steps), "--max_train_samples", str(PROXY_SAMPLES),
                 "--dev_file", PROXY_DEV]  # the smallest dev set: one evaluation a stage, not the paper's choice
        batch = flag_values(row.tokens, "--batch_size")
        flags += ["--batch_size", str(min(PROXY_BATCH, int(batch[0]) if batch else PROXY_BATCH))]
        if kind == "diffcse":
            flags += ["--generator_name", os.path.join(self.proxy_dir, "diffcse-generator")]
        for flag in ("--train_file", "--nli_file"):  # NLI training files the data folder lacks
            files = flag_values(row.tokens, flag)
            if any("KorNLI/" in f and "train" in f for f in files) and not all(
                    os.path.isfile(os.path.join(args.data_dir, f)) for f in files):
                present = [f for f in PROXY_NLI if os.path.isfile(os.path.join(args.data_dir, f))]
                flags += [flag, *(present or PROXY_NLI)]  # none present: train.py names the missing files
        return flags

    def resume_command(self, row, seed):
        command = [sys.executable, rel(os.path.join(ROOT, row.folder, "train.py")), "--resume", self.run_dir(row, seed)]
        return command + (["--device", self.args.device] if self.args.device else [])

    def eval_command(self, row, seed):
        run_dir = self.run_dir(row, seed)
        command = [sys.executable, rel(os.path.join(ROOT, row.folder, "evaluation.py")),
                   "--model_dir", os.path.join(run_dir, "best_model"), "--data_dir", self.args.data_dir,
                   "--dataset", *(PROXY_DATASETS if self.args.proxy else DATASETS), "--protocol", *PROTOCOLS,
                   "--batch_size", str(row.bmk_batch),
                   "--output_json", os.path.join(run_dir, "results.json")]
        return command + (["--device", self.args.device] if self.args.device else [])

    def device(self):
        if self.args.device:
            return "cuda" if self.args.device.startswith("cuda") else "cpu"
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def state(self, row, seed):
        """done (results exist), trained (evaluate only), interrupted (resume) or new."""
        run_dir = self.run_dir(row, seed)
        if os.path.isfile(os.path.join(run_dir, "results.json")):
            return "done"
        if os.path.isfile(os.path.join(run_dir, "trained.json")):
            return "trained"
        if os.path.isfile(os.path.join(run_dir, "checkpoint", "state.pt")) and os.path.isfile(
                os.path.join(run_dir, "args.json")):
            return "interrupted"
        return "new"


# --- proxy models ----------------------------------------------------------------------------------

def proxy_texts(data_dir, n=400):
    """A few hundred Korean lines for the tiny tokenizers: wiki lines, else KorSTS train sentences."""
    wiki = os.path.join(data_dir, "wiki", "wiki_corpus.txt")
    if os.path.isfile(wiki):
        with open(wiki, encoding="utf-8") as f:
            return [line.strip() for line, _ in zip(f, range(n)) if line.strip()]
    with open(os.path.join(data_dir, "KorSTS", "sts-train.tsv"), encoding="utf-8") as f:
        return [s for line in list(f)[1:n // 2 + 1] for s in line.rstrip("\n").split("\t")[5:7]]


def wordpiece(texts, specials, single, pair=None, vocab_size=1000):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    unk = "[UNK]" if "[UNK]" in specials else "<unk>"
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in single])
    return tok


def build_proxy_models(out_dir, kinds, data_dir, log=print):
    """Tiny random models (hidden 32, 2 layers) for the rows with no local pretrained model."""
    import torch
    from transformers import (BartConfig, BartModel, BertConfig, BertForMaskedLM, BertModel,
                              PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)
    texts = proxy_texts(data_dir)
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=512)
    todo = [k for k in sorted(set(kinds) - {"pretrained"})
            if not os.path.isfile(os.path.join(out_dir, k, "config.json"))]
    for kind in todo:
        path = os.path.join(out_dir, kind)
        os.makedirs(path, exist_ok=True)
        torch.manual_seed(0)
        if kind == "t5":
            tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece(texts, ["<pad>", "</s>", "<unk>"], "$A </s>"),
                                          pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)
            T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                decoder_start_token_id=tok.pad_token_id)).save_pretrained(path)
        elif kind == "bart":
            tok = PreTrainedTokenizerFast(
                tokenizer_object=wordpiece(texts, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>"),
                bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)
            BartModel(BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 decoder_start_token_id=tok.eos_token_id)).save_pretrained(path)
        elif kind == "skt":  # SKT KoBERT's layout: a sentencepiece model named by an XLNetTokenizer config
            import sentencepiece as spm
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_prefix=os.path.join(path, "spiece"), vocab_size=2000,
                model_type="unigram", unk_id=0, pad_id=1, bos_id=-1, eos_id=-1, unk_piece="[UNK]", pad_piece="[PAD]",
                user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], hard_vocab_limit=False,
                character_coverage=0.995, minloglevel=2)
            os.remove(os.path.join(path, "spiece.vocab"))
            with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "XLNetTokenizer", "do_lower_case": False, "remove_space": True,
                           "keep_accents": False, "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                           "sep_token": "[SEP]", "mask_token": "[MASK]"}, f, indent=2)
            size = spm.SentencePieceProcessor(model_file=os.path.join(path, "spiece.model")).get_piece_size()
            BertModel(BertConfig(vocab_size=size, pad_token_id=1, **tiny)).save_pretrained(path)
            log(f"proxy model: {path} (random BERT, SKT KoBERT tokenizer layout)")
            continue
        elif kind == "diffcse":  # encoder + masked-LM generator sharing one tokenizer
            specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            tok = PreTrainedTokenizerFast(
                tokenizer_object=wordpiece(texts, specials, "[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"),
                pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                model_max_length=512)
            BertModel(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **tiny)).save_pretrained(path)
            generator = os.path.join(out_dir, "diffcse-generator")
            tok.save_pretrained(generator)
            BertForMaskedLM(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                       **{**tiny, "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32})
                            ).save_pretrained(generator)
        tok.save_pretrained(path)
        log(f"proxy model: {path} (random {kind})")


# --- running ---------------------------------------------------------------------------------------

def shown(command):
    """The command as a shell line, with ``python`` for this interpreter when that is what PATH finds."""
    import shutil
    found = shutil.which("python")
    same = found and os.path.realpath(found) == os.path.realpath(sys.executable)
    return shlex.join(["python" if same and i == 0 else c for i, c in enumerate(command)])


def run_logged(command, log_path):
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + shown(command) + "\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def tail(path, n=15):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def run_all(plan, rows, seeds, log=print):
    """Train and evaluate every (row, seed) not done yet; returns {(row id, seed): status}."""
    status, jobs = {}, [(r, s) for r in rows for s in seeds]
    if plan.args.proxy and not plan.args.dry_run:
        build_proxy_models(plan.proxy_dir, {r.kind for r in rows if plan.skip_reason(r) is None},
                           plan.args.data_dir, log)
    note = (lambda text: log("# " + text)) if plan.args.dry_run else log  # dry run: only commands uncommented
    for i, (row, seed) in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {row.id} seed {seed}:"
        reason = plan.skip_reason(row)
        if reason:
            status[row.id, seed] = f"not run: {reason}"
            note(f"{head} not run ({reason})")
            continue
        state, run_dir = plan.state(row, seed), plan.run_dir(row, seed)
        if state == "done":
            status[row.id, seed] = "done"
            note(f"{head} results exist, skipped")
            continue
        train, dropped = plan.train_command(row, seed)
        if state == "interrupted":
            train = plan.resume_command(row, seed)
        steps = ([] if state == "trained" else [("train", train)]) + [("eval", plan.eval_command(row, seed))]
        if plan.args.dry_run:
            note(f"{head} {state}" + (f" (dropped from the preset here: {' '.join(dropped)})" if dropped else ""))
            for _, command in steps:
                log(shown(command))
            status[row.id, seed] = "dry run"
            continue
        os.makedirs(run_dir, exist_ok=True)
        for what, command in steps:
            verb = {"train": "resume" if state == "interrupted" else "train", "eval": "evaluate"}[what]
            log(f"{head} {verb} ...")
            start = time.time()
            log_path = os.path.join(run_dir, f"{what}.log")
            rc = run_logged(command, log_path)
            took = time.time() - start
            if rc != 0:
                status[row.id, seed] = f"failed ({what}, rc {rc}, {rel(log_path)})"
                log(f"{head} {verb} FAILED after {took:.0f}s (rc {rc}); the end of {rel(log_path)}:\n{tail(log_path)}")
                break
            log(f"{head} {verb} ok ({took:.0f}s)")
            if what == "train":
                with open(os.path.join(run_dir, "trained.json"), "w") as f:
                    json.dump({"command": command, "dropped": dropped, "seconds": round(took, 1),
                               "proxy": plan.args.proxy, "max_steps": plan.args.max_steps}, f, indent=2)
        else:
            status[row.id, seed] = "done"
    return status


# --- the table -------------------------------------------------------------------------------------

def mean_std(values):
    """(mean, sample standard deviation or None for fewer than 2 values, n); NaNs count as values."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def load_results(plan, row, seeds):
    """{(dataset, protocol): {metric: [value per seed]}} from the runs' results.json."""
    found = {}
    for seed in seeds:
        path = os.path.join(plan.run_dir(row, seed), "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for entry in json.load(f):
                cell = found.setdefault((entry["dataset"], entry["protocol"]), {})
                for key in ("avg",) + METRICS:
                    cell.setdefault(key, []).append(float(entry["metrics"][key]))
    return found


def summarize(rows, plan, seeds, proxy=None):
    """The table as data: per row and dataset the published numbers, ours (mean, std, n per protocol and
    metric) and, outside proxy runs, ours minus published under the published protocol."""
    table = []
    for row in rows:
        results = load_results(plan, row, seeds) if row.preset else {}
        published = {p["dataset"]: p for p in row.published}
        datasets = list(SHOWN) + [d for d in published if d not in SHOWN]
        entry = {"row": row.id, "folder": row.folder, "table": row.table, "published_row": row.published_id,
                 "preset": rel(row.preset) if row.preset else None, "labels": row.labels(), "datasets": {},
                 "not_reproducible": row.not_reproducible}
        if proxy:
            entry["labels"] = ["proxy" + (", wiring only" if row.kind != "pretrained" else "")] + entry["labels"]
        dropped = set()
        for seed in seeds:
            trained = os.path.join(plan.run_dir(row, seed), "trained.json") if row.preset else ""
            if os.path.isfile(trained):
                with open(trained) as f:
                    dropped.update(json.load(f).get("dropped") or [])
        if dropped:
            entry["labels"].append("run without " + " ".join(sorted(dropped)))
        for dataset in datasets:
            pub = published.get(dataset)
            cell = {"published": None if pub is None else {
                "protocol": pub["protocol"], "source": pub["source"], "note": pub["note"],
                "metrics": {k: pub[k] for k in ("avg",) + METRICS}}, "ours": {}, "diff": None}
            for protocol in PROTOCOLS:
                values = results.get((dataset, protocol))
                if values:
                    stats = {k: mean_std(v) for k, v in values.items()}
                    cell["ours"][protocol] = {"n": stats["avg"][2], "mean": {k: s[0] for k, s in stats.items()},
                                              "std": {k: s[1] for k, s in stats.items()}}
            ours = cell["ours"].get(pub["protocol"]) if pub else None
            if ours and not proxy:
                cell["diff"] = {"protocol": pub["protocol"], "metrics": {
                    k: None if pub[k] is None else ours["mean"][k] - pub[k] for k in ("avg",) + METRICS}}
            entry["datasets"][dataset] = cell
        table.append(entry)
    return table


def fmt(value, std=None):
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std is not None and not math.isnan(std) else "")


def fmt_diff(value):
    return "–" if value is None else "nan" if math.isnan(value) else f"{value:+.2f}"


def markdown(table, seeds, status, proxy=None, max_steps=None, full=False):
    keys = ("avg",) + METRICS if full else BRIEF
    lines = []
    if proxy:
        lines += [f"# PROXY run: {proxy}, --max_steps {max_steps}, seeds {' '.join(map(str, seeds))}", "",
                  "Proxy numbers check the wiring end to end; they are NOT comparable with the papers'. The "
                  "published numbers are shown as reference only, with no difference.", ""]
    else:
        lines += [f"# Paper table: published vs ours (mean ± std over seeds {' '.join(map(str, seeds))})", "",
                  "standard = correlations over the whole set; bmk = BM-K's per-batch average. Δ = ours − published, "
                  "under the protocol the source used.", ""]
    header = "| row | dataset | | " + " | ".join(SHORT[k] for k in keys) + " |"
    rule = "|---|---|---|" + "---:|" * len(keys)
    for group in TABLES + ("other",):
        entries = [e for e in table if e["table"] == group]
        if not entries:
            continue
        lines += [f"## {group}", "", header, rule]
        for e in entries:
            runs = [status.get((e["row"], s)) for s in seeds]
            name = f"**{e['row']}**" + (f" ({'; '.join(e['labels'])})" if e["labels"] else "")
            if e["preset"] is None:
                name += " (not reproducible: no recipe)" if e.get("not_reproducible") else " (no preset yet)"
            elif not any(c["ours"] for c in e["datasets"].values()):
                why = next((r for r in runs if r and r not in ("done", "dry run")), "not run")
                name += f" ({why})"
            first = True
            for dataset, cell in e["datasets"].items():
                out = []
                pub = cell["published"]
                if pub:
                    label = f"published ({pub['protocol']})" + (", reference only" if proxy else "")
                    out.append((label, [fmt(pub["metrics"][k]) for k in keys]))
                for protocol in PROTOCOLS:
                    ours = cell["ours"].get(protocol)
                    if ours:
                        label = f"{'proxy' if proxy else 'ours'} {protocol} (n={ours['n']})"
                        out.append((label, [fmt(ours["mean"][k], ours["std"][k]) for k in keys]))
                if cell["diff"]:
                    out.append((f"Δ {cell['diff']['protocol']}", [fmt_diff(cell["diff"]["metrics"][k]) for k in keys]))
                if not out:
                    continue
                for i, (label, values) in enumerate(out):
                    lines.append(f"| {name if first else ''} | {dataset if i == 0 else ''} | {label} | "
                                 + " | ".join(values) + " |")
                    first = False
        notes = [(e["row"], d, c["published"]["note"]) for e in entries for d, c in e["datasets"].items()
                 if c["published"] and c["published"]["note"]]
        if notes:
            lines.append("")
            lines += [f"- {row} ({dataset}): {note}" for row, dataset, note in notes]
        lines.append("")
    done = sum(1 for v in status.values() if v == "done")
    lines.append(f"{len(status)} runs: {done} with results" + "".join(
        f"; {rid} seed {seed}: {v}" for (rid, seed), v in status.items() if v not in ("done", "dry run")))
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------------

def list_rows(rows):
    print(f"{'row':34} {'folder':13} {'table':15} {'published (dataset, protocol, AVG / cosS)':46} preset")
    for r in rows:
        pub = next((p for p in r.published if p["dataset"] == "korsts-test"), r.published[0] if r.published else None)
        text = (f"{pub['dataset']} {pub['protocol']} {fmt(pub['avg'])} / {fmt(pub['cosine_spearman'])}"
                if pub else "–")
        if r.published_id != r.id:
            text = f"= {r.published_id}"
        flags = ", ".join(r.labels()[1:] if r.published_id != r.id else r.labels())
        preset = rel(r.preset) if r.preset else "(not reproducible)" if r.not_reproducible else "(no preset yet)"
        print(f"{r.id:34} {r.folder:13} {r.table:15} {text:46} {preset}" + (f"  [{flags}]" if flags else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=None, help="row ids (see --list), FOLDER/ROW, or all")
    p.add_argument("--list", action="store_true", help="list the rows and their published numbers")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"), help="data folder (default: %(default)s)")
    p.add_argument("--out", default="output/paper", help="runs and the table go here (default: %(default)s)")
    p.add_argument("--proxy", default=None, metavar="MODEL",
                   help="small wiring check: BERT-like rows on MODEL, the rest on tiny random models (see above)")
    p.add_argument("--max_steps", type=int, default=10, help="--proxy: optimizer steps per stage (default: 10)")
    p.add_argument("--device", default=None, help="passed to train.py and evaluation.py (default: theirs)")
    p.add_argument("--full", action="store_true", help="all 8 numbers in the table (default: AVG, cosP, cosS)")
    p.add_argument("--dry_run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--table_only", action="store_true", help="print the table of the runs already in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = discover_rows()
    if args.list:
        list_rows(rows)
        return 0
    if not args.rows:
        raise SystemExit("error: give --rows ROW [ROW ...] or --rows all (see --list)")
    selected = select_rows(rows, args.rows)
    plan = Plan(args)
    if args.table_only:
        status = {(r.id, s): "done" if plan.state(r, s) == "done" else "not run" for r in selected for s in args.seeds}
    else:
        status = run_all(plan, selected, args.seeds)
    if args.dry_run:
        return 0
    table = summarize(selected, plan, args.seeds, proxy=args.proxy)
    text = markdown(table, args.seeds, status, args.proxy, args.max_steps, args.full)
    print()
    print(text, end="")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "paper_table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "paper_table.json"), "w", encoding="utf-8") as f:
        json.dump({"seeds": args.seeds, "proxy": args.proxy, "max_steps": args.max_steps if args.proxy else None,
                   "runs": {f"{r} seed {s}": v for (r, s), v in status.items()}, "rows": table},
                  f, ensure_ascii=False, indent=2)
    print(f"table: {rel(os.path.join(args.out, 'paper_table.md'))}, {rel(os.path.join(args.out, 'paper_table.json'))}")
    return 1 if any(v.startswith("failed") for v in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
