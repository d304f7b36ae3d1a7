"""Record asymmetric prompts in a saved model folder the sentence-transformers way, so that
``SentenceTransformer(folder).encode(q, prompt_name="query")`` puts the same prefix before q as
``evaluation.py --query_prefix`` does, and evaluation.py uses them when no prefix flag is given:

    python utils/set_prompts.py FOLDER --query "query: " --passage "passage: "

config_sentence_transformers.json gets {"prompts": {"query": ..., "passage": ...}, "default_prompt_name": null},
merged with the keys already there (matryoshka_dims, truncate_dim, ...), written atomically."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "KoSimCSE"))
from common.encoding import update_st_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a saved model folder (with modules.json)")
    p.add_argument("--query", default=None, help='the "query" prompt, e.g. "query: "')
    p.add_argument("--passage", default=None, help='the "passage" prompt, e.g. "passage: "')
    args = p.parse_args(argv)
    if args.query is None and args.passage is None:
        p.error("give --query and/or --passage")
    if not os.path.isfile(os.path.join(args.folder, "modules.json")):
        p.error(f"{args.folder}: not a sentence-transformers model folder (no modules.json)")
    path = os.path.join(args.folder, "config_sentence_transformers.json")
    try:
        prompts = json.load(open(path, encoding="utf-8")).get("prompts") or {} if os.path.isfile(path) else {}
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path}:{e.lineno}: not JSON ({e.msg})")
    prompts.update({k: v for k, v in (("query", args.query), ("passage", args.passage)) if v is not None})
    update_st_config(args.folder, prompts=prompts, default_prompt_name=None)
    print(f"{path}: prompts {prompts}")


if __name__ == "__main__":
    main()
