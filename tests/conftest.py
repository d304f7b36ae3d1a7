"""Shared fixtures: tiny random models with a locally trained tokenizer, synthetic Korean data in the
real file layouts, the real data under ../shared/data when present, and per-folder module loading.

Every method folder has modules called dataloader/model/evaluation/train, so ``load_method`` imports
one folder's set under private names and the folders never see each other's modules.
"""
import importlib
import os
import random
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("KOSENT_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
METHOD_MODULES = ("dataloader", "model", "evaluation", "train")

# Synthetic "topics": sentences of one topic share content words, so a model can learn that they
# are similar. Used for NLI triplets, STS pairs and wiki sentences in the real file formats.
TOPICS = [
    ["사과", "바나나", "포도", "딸기", "수박", "과일"],
    ["바다", "파도", "모래", "해변", "수영", "조개"],
    ["축구", "공", "골", "선수", "경기", "감독"],
    ["기차", "역", "승객", "표", "선로", "출발"],
    ["고양이", "강아지", "먹이", "꼬리", "산책", "동물"],
    ["컴퓨터", "키보드", "화면", "프로그램", "코드", "전원"],
    ["비", "우산", "구름", "날씨", "바람", "천둥"],
    ["책", "도서관", "작가", "소설", "페이지", "독서"],
]
FILLERS = ["그리고", "오늘", "정말", "아주", "다시", "함께"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (trains, spawns processes or reads the real "
                                       "data); `python -m pytest -q -m \"not slow\" tests` is the fast inner loop")


def load_method(folder):
    """Import <folder>/{dataloader,model,evaluation,train}.py and its common/ package as a namespace,
    isolated from other folders: ``ns.train``, ``ns.model``, ..., and each common module by its name
    (``ns.flags``, ``ns.data``, ``ns.sts``, ``ns.index``, ...)."""
    path = os.path.join(ROOT, folder)
    ours = lambda name: name in METHOD_MODULES or name == "common" or name.startswith("common.")
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
    sys.path.insert(0, path)
    try:
        ns = types.SimpleNamespace(path=path)
        for name in METHOD_MODULES:
            if os.path.exists(os.path.join(path, name + ".py")):
                setattr(ns, name, importlib.import_module(name))
        for file in sorted(os.listdir(os.path.join(path, "common"))):
            if file.endswith(".py") and file != "__init__.py":
                setattr(ns, file[:-3], importlib.import_module("common." + file[:-3]))
        return ns
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if ours(n)]:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def readers(ns):
    """A method folder's readers: its dataloader.py and common/data.py as one namespace."""
    return types.SimpleNamespace(**{k: v for module in (ns.data, ns.dataloader) for k, v in vars(module).items()
                                    if not k.startswith("__")})


def evaluation_api(ns):
    """A method folder's evaluation.py and every common module it drives, as one namespace."""
    modules = [getattr(ns, name) for name in ("data", "encoding", "tokenizer", "folder", "sts", "search", "index",
                                                "model_card") if hasattr(ns, name)] + [ns.evaluation]
    return types.SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items() if not k.startswith("__")})


def topic_sentence(rng, topic, n_words=4):
    words = rng.sample(TOPICS[topic], n_words) + [rng.choice(FILLERS)]
    rng.shuffle(words)
    return " ".join(words) + "."


def write_synthetic_data(root, seed=0, n_nli=300, n_sts=120, n_wiki=400):
    """Tiny data in the real layouts: KorNLI TSV, KorSTS TSV (with a raw-quote row and no final
    newline, like the real dev/test), KLUE-STS JSON, wiki text."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "KorNLI"), exist_ok=True)
    os.makedirs(os.path.join(root, "KorSTS"), exist_ok=True)
    os.makedirs(os.path.join(root, "KLUE-STS"), exist_ok=True)
    os.makedirs(os.path.join(root, "wiki"), exist_ok=True)
    with open(os.path.join(root, "KorNLI", "nli.train.ko.tsv"), "w") as f:
        f.write("sentence1\tsentence2\tgold_label\n")
        for _ in range(n_nli):
            t, other = rng.sample(range(len(TOPICS)), 2)
            premise = topic_sentence(rng, t)
            f.write(f"{premise}\t{topic_sentence(rng, t)}\tentailment\n")
            f.write(f"{premise}\t{topic_sentence(rng, rng.randrange(len(TOPICS)))}\tneutral\n")
            f.write(f"{premise}\t{topic_sentence(rng, other)}\tcontradiction\n")

    def sts_rows(n):
        rows = []
        for _ in range(n):
            t = rng.randrange(len(TOPICS))
            shared = rng.randint(0, 4)  # content words the two sentences share
            if shared == 0:
                u = rng.choice([x for x in range(len(TOPICS)) if x != t])
                s1, s2, score = topic_sentence(rng, t), topic_sentence(rng, u), rng.uniform(0, 1)
            else:
                s1 = topic_sentence(rng, t)
                s2 = topic_sentence(rng, t, n_words=shared)
                score = min(5.0, 1.0 + shared + rng.uniform(-0.3, 0.3))
            rows.append((s1, s2, round(score, 3)))
        return rows

    header = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2"
    for split, n in (("train", n_sts), ("dev", n_sts), ("test", n_sts)):
        rows = sts_rows(n)
        if split == "dev":
            rows[0] = ('"슈퍼맨" 셔츠를 입은 개가 뛴다.', '"more posh" 라는 말', 0.4)  # raw quotes, as KorSTS
        lines = [header] + [f"main-news\tsynthetic\t2020\t{i:04d}\t{s}\t{a}\t{b}" for i, (a, b, s) in enumerate(rows)]
        with open(os.path.join(root, "KorSTS", f"sts-{split}.tsv"), "w") as f:
            f.write("\n".join(lines) + ("\n" if split == "train" else ""))
    import json
    with open(os.path.join(root, "KLUE-STS", "klue-sts-v1.1_dev.json"), "w") as f:
        json.dump([{"guid": f"syn-{i}", "sentence1": a, "sentence2": b,
                    "labels": {"label": round(s, 1), "real-label": s, "binary-label": int(s >= 3)}}
                   for i, (a, b, s) in enumerate(sts_rows(60))], f, ensure_ascii=False)
    with open(os.path.join(root, "wiki", "wiki_corpus.txt"), "w") as f:
        for _ in range(n_wiki):
            f.write(topic_sentence(rng, rng.randrange(len(TOPICS))) + "\n")
    return root


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return write_synthetic_data(str(tmp_path_factory.mktemp("data")))


def train_tokenizer(out_dir, texts):
    """A WordPiece tokenizer trained on ``texts``, saved as a BERT-style fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)
    fast.save_pretrained(out_dir)
    return fast


def corpus_texts():
    rng = random.Random(1)
    texts = [topic_sentence(rng, t) for t in range(len(TOPICS)) for _ in range(30)]
    texts += [" ".join(TOPICS[t]) for t in range(len(TOPICS))] + [" ".join(FILLERS)]
    texts += ['"슈퍼맨" 셔츠를 입은 개가 뛴다.', '"more posh" 라는 말', "한 남자가 음식을 먹는다."]
    return texts


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Folder with a random 2-layer BERT (hidden 32) and its tokenizer."""
    from transformers import BertConfig, BertModel
    import torch
    out = str(tmp_path_factory.mktemp("tiny-bert"))
    tok = train_tokenizer(out, corpus_texts())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tiny_bert, tmp_path_factory):
    """tiny_bert's tokenizer and size with dropout 0, so that train mode is deterministic (DDP tests)."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    import torch
    out = str(tmp_path_factory.mktemp("tiny-bert-nodrop"))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(out)
    return out


def torchrun(*args, nproc=2, timeout=180):
    """``torchrun --standalone --nproc_per_node nproc args...`` (gloo on CPU), one thread per process."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", *args], env=env, capture_output=True, text=True, timeout=timeout)


def single_and_ddp(script, folder, model, tmp_path):
    """Run tests/scripts/<script> on the method folder once in one process and once under 2-rank torchrun;
    the two state dicts it saved (single process, DDP)."""
    import subprocess
    import torch
    script, method = os.path.join(ROOT, "tests", "scripts", script), os.path.join(ROOT, folder)
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    run = subprocess.run([sys.executable, script, method, model, single], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    run = torchrun(script, method, model, double)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(single), torch.load(double)


def seq2seq_tokenizer(out_dir, specials, single):
    """A WordPiece tokenizer over the test corpus with T5- or BART-style special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    unk = "<unk>"
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus_texts(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in single])
    names = {"<pad>": "pad_token", "</s>": "eos_token", "<unk>": "unk_token", "<s>": "bos_token"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **{names[s]: s for s in specials})
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """Folder with a random 2-layer T5 (d_model 32; the full model on disk) and its tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    out = str(tmp_path_factory.mktemp("tiny-t5"))
    tok = seq2seq_tokenizer(out, ["<pad>", "</s>", "<unk>"], "$A </s>")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                        num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
                               ).save_pretrained(out)  # full model on disk: the decoder must not be loaded
    return out


@pytest.fixture(scope="session")
def generator(tiny_bert, tmp_path_factory):
    """A random 1-layer MLM generator (hidden 16) sharing tiny_bert's tokenizer (KoDiffCSE)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    out = str(tmp_path_factory.mktemp("tiny-generator"))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.save_pretrained(out)
    torch.manual_seed(1)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64,
                               pad_token_id=tok.pad_token_id)).save_pretrained(out)
    return out


def sigkill_after_checkpoint(cmd, out, env):
    """Start training ``cmd``, SIGKILL it a moment after its first checkpoint in ``out`` appears (so the
    kill loses some steps); returns the step of the checkpoint it left."""
    import signal
    import subprocess
    import time
    import torch
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = os.path.join(out, "checkpoint", "state.pt")
    deadline = time.time() + 120
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    return torch.load(state, weights_only=False)["step"]


def crash_after_first_checkpoint(train_module, argv):
    """Run ``train_module.main(argv)`` and stop it (KeyboardInterrupt) right after its first checkpoint."""
    original = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt
    train_module.save_checkpoint = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.main(argv)
    finally:
        train_module.save_checkpoint = original


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(os.path.join(SHARED_DATA, "KorSTS")):
        pytest.skip(f"real data not found at {SHARED_DATA} (set KOSENT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kosimcse():
    return load_method("KoSimCSE")


@pytest.fixture(scope="session")
def kosentencet5():
    return load_method("KoSentenceT5")


def run_train(kosimcse, tiny_bert, data, out, *extra):
    args = ["--model", tiny_bert, "--data_dir", data, "--output_dir", out, "--batch_size", "16",
            "--eval_batch_size", "32", "--max_len", "24", "--seed", "0", "--logging_steps", "5", *extra]
    kosimcse.train.main(args)
    return os.path.join(out, "best_model")


@pytest.fixture(scope="session")
def sup_run(kosimcse, tiny_bert, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sup"))
    best = run_train(kosimcse, tiny_bert, synthetic_data, out, "--mode", "sup", "--train_file",
                     "KorNLI/nli.train.ko.tsv", "--max_steps", "150", "--eval_steps", "50", "--lr", "1e-3",
                     "--warmup_ratio", "0.1", "--pooler", "mean")
    return out, best
