"""Training curves of a run: dev Spearman and training loss against step, from its train_log.jsonl.

    python utils/plot_training.py output/kosimcse-sup [--out curve.png]
    python utils/plot_training.py output/quick/*/          # several runs, a PNG in each

Reads the lines every <method>/train.py writes (``{"step", "loss", ...}`` and
``{"step", "dev": {metrics}}``) and writes a PNG (default: training_curve.png in the run folder).
"""
import argparse
import json
import os


def read_log(path):
    losses, dev = [], []
    with open(path, errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if number >= len(lines) - 1:  # a torn last line (a kill or a full disk mid-append): dropped
                break
            raise SystemExit(f"error: {path}:{number}: not a log entry") from None
        if "loss" in entry:
            losses.append((entry["step"], entry["loss"]))
        if "dev" in entry:
            dev.append((entry["step"], entry["dev"]["cosine_spearman"], entry["dev"]["max_spearman"]))
    return losses, dev


def plot(run_dir, out=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses, dev = read_log(os.path.join(run_dir, "train_log.jsonl"))
    if not losses and not dev:
        raise SystemExit(f"error: {run_dir}/train_log.jsonl has no loss or dev lines")
    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot(*zip(*losses), color="tab:gray", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if dev:
        ax2 = ax.twinx()
        steps, cos, best = zip(*dev)
        ax2.plot(steps, cos, "o-", color="tab:blue", label="dev cosine Spearman")
        ax2.plot(steps, best, "s--", color="tab:orange", label="dev max Spearman")
        ax2.set_ylabel("Spearman x100")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "training_curve.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="+", help="run folders; those without a train_log.jsonl are passed over")
    p.add_argument("--out", default=None, help="the PNG path (one run_dir only)")
    args = p.parse_args()
    if args.out and len(args.run_dir) > 1:
        p.error("--out takes one run_dir")
    for run_dir in args.run_dir:
        if os.path.isfile(os.path.join(run_dir, "train_log.jsonl")):
            print(f"training curve: {plot(run_dir, args.out)}")


if __name__ == "__main__":
    main()
