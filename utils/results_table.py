"""Gather the JSON rows that <method>/evaluation.py writes (--output_json) into the papers' table.

    python utils/results_table.py output/quick            # every *.json below the folder
    python utils/results_table.py a.json b.json --dataset korsts-test

Prints a markdown table: model, AVG and the 8 numbers (cosine/euclidean/manhattan/dot Pearson and
Spearman, x100) with the protocol, dataset and number of pairs of each row, so that a README's
results section is generated from files rather than typed. A run that could not be made leaves a
``NAME.skipped`` file (run_example.sh) whose line is printed as a row of its own.
"""
import argparse
import glob
import json
import os

METRICS = ("cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman",
           "manhattan_pearson", "manhattan_spearman", "dot_pearson", "dot_spearman")
HEADER = "| model | dataset | protocol | pairs | AVG | cosP | cosS | eucP | eucS | manP | manS | dotP | dotS |"


def load_rows(paths):
    rows = []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True)) if os.path.isdir(path) else [path]
        for file in files:
            with open(file, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError:
                    continue
            for row in data if isinstance(data, list) else [data]:
                if isinstance(row, dict) and isinstance(row.get("metrics"), dict) and "avg" in row["metrics"]:
                    rows.append(row)
    return rows


def table(rows, root=None):
    lines = [HEADER, "|---|---|---|---:|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        m, model = row["metrics"], row["model"]
        if root and os.path.isabs(model) is False and model.startswith(root.rstrip("/") + "/"):
            model = model[len(root.rstrip("/")) + 1:]
        lines.append(f"| {model} | {row['dataset']} | {row['protocol']}"
                     + (f" (batch {row['batch_size']})" if row.get("batch_size") else "")
                     + f" | {row.get('n_pairs', '')} | {m['avg']:.2f} | " + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="JSON files or folders to search for them")
    p.add_argument("--dataset", default=None, help="keep only rows of this dataset")
    p.add_argument("--protocol", default=None, help="keep only rows of this protocol")
    args = p.parse_args()
    rows = [r for r in load_rows(args.paths) if (args.dataset in (None, r["dataset"]))
            and (args.protocol in (None, r["protocol"]))]
    print(table(rows, root=args.paths[0] if len(args.paths) == 1 and os.path.isdir(args.paths[0]) else None))
    for path in args.paths:
        for file in sorted(glob.glob(os.path.join(path, "**", "*.skipped"), recursive=True)) if os.path.isdir(path) else []:
            with open(file, encoding="utf-8") as f:
                print(f"| {f.read().strip()} |")


if __name__ == "__main__":
    main()
