"""Search tuning: prompts in training (--query_prefix / --passage_prefix) and utils/merge.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, load_method

MERGE = os.path.join(ROOT, "utils", "merge.py")


@pytest.fixture(scope="module")
def kosbert():
    return load_method("KoSBERT")


@pytest.fixture(scope="module")
def prompted_run(kosbert, tiny_bert, synthetic_data, tmp_path_factory):
    """KoSBERT STS, 4 steps, trained with e5's prompts."""
    out = str(tmp_path_factory.mktemp("prompted"))
    kosbert.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "sts",
                        "--sts_file", "KorSTS/sts-train.tsv", "--pooler", "mean", "--batch_size", "16",
                        "--max_len", "24", "--max_steps", "4", "--eval_steps", "2", "--seed", "0",
                        "--query_prefix", "query: ", "--passage_prefix", "passage: "])
    return out


def test_training_text_carries_the_query_prefix(kosbert, tiny_bert, synthetic_data):
    """The tokenised training batch of every symmetric source starts with the prefix's tokens, and only with it."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    prefix_ids = tokenizer("query:", add_special_tokens=False)["input_ids"]
    assert prefix_ids
    sources = {}
    for prefix in ("", "query: "):
        args = kosbert.train.parse_args(["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "sts",
                                         "--sts_file", "KorSTS/sts-train.tsv", "--max_len", "24",
                                         "--query_prefix", prefix, "--output_dir", "unused"])
        source = kosbert.train.build_source("sts", args, tokenizer, 0, 1, lambda *_: None)
        batch = source.collate([source.dataset[i] for i in range(8)])
        sources[prefix] = batch["input_ids"]
    cls = tokenizer.cls_token_id
    n = len(prefix_ids)
    with_prefix, without = sources["query: "], sources[""]
    assert (with_prefix[:, 0] == cls).all()
    assert (with_prefix[:, 1:1 + n] == torch.tensor(prefix_ids)).all()  # every sentence of both sides
    assert not (without[:, 1:1 + n] == torch.tensor(prefix_ids)).all(dim=1).any()
    lengths_with, lengths_without = (with_prefix != 0).sum(1), (without != 0).sum(1)
    assert ((lengths_with - lengths_without) == n).all()  # the prefix and nothing else was added


@pytest.mark.slow
def test_dev_evaluation_and_saved_prompts_follow_the_training_prefix(prompted_run, tiny_bert, synthetic_data):
    """The saved folder records both prompts; evaluation.py then applies them, and so does sentence-transformers."""
    best = os.path.join(prompted_run, "best_model")
    config = json.load(open(os.path.join(best, "config_sentence_transformers.json")))
    assert config["prompts"] == {"query": "query: ", "passage": "passage: "}
    command = json.load(open(os.path.join(best, "training.json")))["command"]
    assert "--query_prefix 'query: '" in command and "--passage_prefix 'passage: '" in command
    st = pytest.importorskip("sentence_transformers")
    kosimcse = load_method("KoSimCSE")
    model = st.SentenceTransformer(best, device="cpu")
    sentences = ["사과 바나나 과일", "바다 파도 해변"]
    theirs = model.encode(sentences, prompt_name="query", convert_to_numpy=True, normalize_embeddings=True)
    encoder = kosimcse.evaluation.FolderEncoder(best).eval()
    ours = kosimcse.encoding.encode(encoder, encoder.tokenizer, ["query: " + s for s in sentences], 64)
    ours = ours / (ours ** 2).sum(1, keepdims=True) ** 0.5
    assert (theirs * ours).sum(1).min() > 0.99999


def merge(*args):
    return subprocess.run([sys.executable, MERGE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_merge_endpoints_are_exact_and_the_folder_is_kept(prompted_run, tiny_bert, tmp_path):
    best = os.path.join(prompted_run, "best_model")
    out = str(tmp_path / "merged")
    r = merge(best, tiny_bert, "--alpha", "0", "0.25", "1", "--output_dir", out)
    assert r.returncode == 0, r.stderr
    tuned, base = load_file(os.path.join(best, "model.safetensors")), load_file(os.path.join(tiny_bert, "model.safetensors"))
    m0, m1 = (load_file(os.path.join(out, f"alpha-{a}", "model.safetensors")) for a in ("0", "1"))
    quarter = load_file(os.path.join(out, "alpha-0.25", "model.safetensors"))
    for name in tuned:
        assert torch.equal(m1[name], tuned[name]), name
        assert torch.equal(m0[name], base[name]), name
        want = 0.75 * base[name].double() + 0.25 * tuned[name].double()
        assert torch.allclose(quarter[name].double(), want, atol=1e-6), name
    assert any(not torch.equal(tuned[n], base[n]) for n in tuned)  # training did move the weights
    folder = os.path.join(out, "alpha-0.25")
    assert json.load(open(os.path.join(folder, "1_Pooling", "config.json")))["pooling_mode_mean_tokens"]
    assert json.load(open(os.path.join(folder, "config_sentence_transformers.json")))["prompts"]["query"] == "query: "
    info = json.load(open(os.path.join(folder, "training.json")))
    assert info["merge"]["alpha"] == 0.25 and info["merge"]["base"] == os.path.abspath(tiny_bert)
    assert "## Merge" in open(os.path.join(folder, "README.md")).read()
    assert json.load(open(os.path.join(best, "eval_results.json")))  # the fine-tuned model's dev row ...
    assert json.load(open(os.path.join(folder, "eval_results.json"))) == []  # ... is not the merged model's
    again = merge(best, tiny_bert, "--alpha", "0.25", "--output_dir", out)
    assert again.returncode == 0 and "already merged" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "nan", "x"])
def test_merge_refuses_a_weight_outside_0_1(alpha, tmp_path):
    r = merge(str(tmp_path), str(tmp_path), "--alpha", alpha, "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--alpha" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_merge_refuses_two_architectures(prompted_run, tmp_path):
    from transformers import BertConfig, BertModel
    other = str(tmp_path / "wider")
    BertModel(BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(other)
    r = merge(os.path.join(prompted_run, "best_model"), other, "--alpha", "0.5", "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "different architectures" in r.stderr, r.stderr
    assert not os.path.exists(str(tmp_path / "o" / "alpha-0.5"))


# --- pairs training --------------------------------------------------------------------------------------

def write_pairs_inputs(root):
    """A pairs TSV (with negatives) and a BEIR folder with a train split, from the synthetic topics."""
    from conftest import TOPICS
    os.makedirs(os.path.join(root, "beir", "qrels"), exist_ok=True)
    rows, queries, corpus, qrels = [], [], [], []
    for t, words in enumerate(TOPICS * 4):
        query = f"{words[t % 6]} {words[(t + 1) % 6]}"
        passage = " ".join(words[(t + i) % 6] for i in range(5)) + " 그리고 정말"
        negative = " ".join(TOPICS[(t + 3) % len(TOPICS)][:4])
        rows.append(f"{query}\t{passage}\t{negative}\n")
        queries.append(json.dumps({"_id": f"q{t}", "text": query}, ensure_ascii=False) + "\n")
        corpus.append(json.dumps({"_id": f"d{t}", "title": "", "text": passage}, ensure_ascii=False) + "\n")
        qrels.append(f"q{t}\td{t}\t1\n")
    open(os.path.join(root, "pairs.tsv"), "w").write("anchor\tpositive\tnegative\n" + "".join(rows))
    open(os.path.join(root, "beir", "queries.jsonl"), "w").write("".join(queries))
    open(os.path.join(root, "beir", "corpus.jsonl"), "w").write("".join(corpus))
    open(os.path.join(root, "beir", "qrels", "train.tsv"), "w").write("query-id\tcorpus-id\tscore\n" + "".join(qrels))
    return os.path.join(root, "pairs.tsv"), os.path.join(root, "beir")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tsv", "beir"])
def test_pairs_training_runs_from_tsv_and_beir(which, kosimcse, tiny_bert, synthetic_data, tmp_path):
    tsv, beir = write_pairs_inputs(str(tmp_path))
    out = str(tmp_path / "run")
    kosimcse.train.main(["--mode", "pairs", "--model", tiny_bert, "--data_dir", synthetic_data, "--train_file",
                         tsv if which == "tsv" else beir, "--output_dir", out, "--batch_size", "8", "--max_len", "16",
                         "--passage_max_len", "32", "--max_steps", "2", "--eval_steps", "2", "--seed", "0",
                         "--decontaminate", "warn", "--logging_steps", "1"])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    assert sorted(losses) == [1, 2] and all(0 < v < 10 for v in losses.values())
    assert [e["stage"] for e in log if "loss" in e] == ["pairs"] * 2
    best = os.path.join(out, "best_model")
    prompts = json.load(open(os.path.join(best, "config_sentence_transformers.json")))["prompts"]
    assert prompts == {"query": "query: ", "passage": "passage: "}  # from presets/pairs.args
    training = json.load(open(os.path.join(best, "training.json")))
    assert training["mode"] == "pairs"


def test_pairs_and_sts_train_together(kosimcse, tiny_bert, synthetic_data, tmp_path):
    """--mode pairs_sts: pair batches and KorSTS batches interleaved in one stage, both losses logged."""
    tsv, _ = write_pairs_inputs(str(tmp_path))
    out = str(tmp_path / "run")
    kosimcse.train.main(["--mode", "pairs_sts", "--model", tiny_bert, "--data_dir", synthetic_data, "--train_file",
                         tsv, "--sts_file", "KorSTS/sts-train.tsv", "--output_dir", out, "--batch_size", "8",
                         "--sts_batch_size", "8", "--max_len", "16", "--passage_max_len", "32", "--max_steps", "4",
                         "--eval_steps", "4", "--logging_steps", "4", "--decontaminate", "warn"])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    record = next(e for e in log if "loss" in e)
    assert record["stage"] == "pairs_sts" and {"loss_pairs+negative", "loss_sts"} <= record.keys()


def test_pairs_batch_carries_both_prefixes_and_lengths(kosimcse, tiny_bert, tmp_path):
    """Queries get the query prefix and --max_len, passages the passage prefix and --passage_max_len."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tsv, _ = write_pairs_inputs(str(tmp_path))
    dataset = kosimcse.dataloader.build_contrastive_dataset(
        "pairs", [tsv], tokenizer, 6, prefix="query: ", passage_prefix="passage: ", passage_max_len=12,
        log=lambda *_: None)
    assert dataset.num_columns == 3 and len(dataset) == 32
    q_ids = tokenizer("query:", add_special_tokens=False)["input_ids"]
    p_ids = tokenizer("passage:", add_special_tokens=False)["input_ids"]
    for query, positive, negative in (dataset[i] for i in range(len(dataset))):
        assert list(query[1:1 + len(q_ids)]) == q_ids and len(query) <= 6
        for passage in (positive, negative):
            assert list(passage[1:1 + len(p_ids)]) == p_ids and len(passage) <= 12
    assert max(len(dataset[i][1]) for i in range(len(dataset))) > 6  # passages were not cut at the query limit


@pytest.mark.parametrize("content, message", [
    ("anchor\tpositive\n질문\n", "pairs.tsv:2: 1 tab-separated field(s), the header has 2"),
    ("anchor\tpositive\n질문\t \n", "pairs.tsv:2: the positive is empty"),
    ("query\tpassage\n질문\t답\n", "pairs.tsv:1: the header must be anchor<TAB>positive"),
    ("anchor\tpositive\n", "pairs.tsv: a header and no pairs"),
])
def test_bad_pairs_file_is_one_line(content, message, kosimcse, tiny_bert, synthetic_data, tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(["--mode", "pairs", "--model", tiny_bert, "--data_dir", synthetic_data, "--train_file",
                             str(path), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_beir_folder_without_train_qrels_is_one_line(kosimcse, tiny_bert, synthetic_data, tmp_path):
    _, beir = write_pairs_inputs(str(tmp_path))
    os.remove(os.path.join(beir, "qrels", "train.tsv"))
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(["--mode", "pairs", "--model", tiny_bert, "--data_dir", synthetic_data, "--train_file",
                             beir, "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    assert "no qrels/train.tsv" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def kosimcse():
    return load_method("KoSimCSE")
