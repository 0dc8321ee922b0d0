"""Evaluation: the lm-eval adapter scores exactly what the model computes, `scion eval` runs
local harness tasks offline (a multiple-choice task the model was trained to know, and a
rolling-perplexity task), data perplexity and bits per byte are exact, and training can run
harness tasks every N steps."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interop_helpers import LLAMA, TEXT, make_run, tokenizer

from scion.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from scion.errors import ScionError
from scion.generate import generate
from scion.run import load_model

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from scion.evaluate.harness import ScionLM, unknown_task_message  # noqa: E402
from scion.evaluate.perplexity import evaluate_data  # noqa: E402

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

CAPITALS = {"France": "Paris", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="session")
def facts(tmp_path_factory) -> dict[str, Path]:
    """A corpus stating eight capitals, and two harness tasks defined by local YAML + JSONL."""
    root = tmp_path_factory.mktemp("facts")
    rng = random.Random(0)
    sentences = [f"The capital of {c} is {CAPITALS[c]}." for c in rng.choices(list(CAPITALS), k=400)]
    (root / "facts.jsonl").write_text("".join(json.dumps({"text": " ".join(sentences[i:i + 5])}) + "\n"
                                              for i in range(0, len(sentences), 5)))
    docs = []
    for country, capital in CAPITALS.items():
        choices = [capital] + rng.sample([c for c in CAPITALS.values() if c != capital], 3)
        rng.shuffle(choices)
        docs.append({"question": f"The capital of {country} is", "choices": choices,
                     "answer": choices.index(capital)})
    (root / "capitals.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences[:6]))
    tasks = root / "tasks"
    tasks.mkdir()
    # The harness resolves data_files against the working directory: absolute paths.
    (tasks / "capitals.yaml").write_text(f"""task: scion_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'capitals.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tasks / "rolling.yaml").write_text(f"""task: scion_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""")
    return {"root": root, "corpus": root / "facts.jsonl", "tasks": tasks}


@pytest.fixture(scope="session")
def facts_run(facts, tmp_path_factory, cache_dir) -> Path:
    """A tiny model trained on the capitals (in-process, a few seconds on an idle machine; it
    knows them all by step 75 or so), evaluating the multiple-choice task every 40 steps through
    the training hook."""
    from scion.pretrain import pretrain

    train = TrainConfig(max_steps=80, micro_batch_size=16, lr=5e-3, min_lr=5e-4, warmup_steps=5, log_every=20,
                        eval_every=40, eval_batches=2, sample_every=1000, checkpoint_every=40, device="cpu",
                        precision="fp32", eval_tasks=["scion_capitals"], eval_tasks_every=40,
                        eval_tasks_limit=8, eval_tasks_include=str(facts["tasks"]))
    model = ModelConfig(vocab_size=384, n_layer=2, n_head=2, d_model=48, ffn_hidden=128, max_seq_len=16)
    cfg = RunConfig(model=model, data=DataConfig(path=[str(facts["corpus"])], val_fraction=0.1), train=train)
    out = tmp_path_factory.mktemp("runs") / "facts"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, above all on a busy machine
    try:
        pretrain(cfg, out, resume=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def test_training_logs_harness_tasks_every_n_steps(facts_run):
    records = [json.loads(line) for line in (facts_run / "metrics.jsonl").read_text().splitlines()]
    tasks = [r for r in records if "tasks/scion_capitals/acc" in r]
    assert [r["step"] for r in tasks] == [40, 80]
    assert all(0.0 <= r["tasks/scion_capitals/acc"] <= 1.0 for r in tasks)
    assert tasks[-1]["tasks/average"] == tasks[-1]["tasks/scion_capitals/acc"]


def test_eval_cli_scores_local_tasks_and_data(facts_run, facts, run_scion, tmp_path):
    out = tmp_path / "results.json"
    proc = run_scion("eval", facts_run, "--tasks", "scion_capitals,scion_rolling",
                     "--include-path", facts["tasks"], "--checkpoints", "all", "--batch-size", "4",
                     "--data", facts["root"] / "text.jsonl", "--out", out, cwd=tmp_path)
    results = json.loads(out.read_text())
    assert [r["step"] for r in results["rows"]] == [40, 80]
    final = results["rows"][-1]
    # Eight questions, four choices each: chance is 25%; the model was trained on the answers.
    headline = final["scores"]["headline"]["scion_capitals"]
    assert headline == {"metric": "acc", "value": final["scores"]["average"]}
    assert final["scores"]["average"] >= 0.75
    rolling = final["scores"]["metrics"]["scion_rolling"]
    assert 0 < rolling["bits_per_byte"] < 8 and rolling["word_perplexity"] > 1
    assert 0 < final["data"]["bits_per_byte"] < 8 and final["data"]["tokens"] > 0
    # The table: tasks as columns, one row per checkpoint, an average.
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| checkpoint"))
    assert "scion_capitals (acc)" in header and "scion_rolling (word_perplexity)" in header
    assert header.endswith("| avg |")
    assert sum(line.startswith("| step-") for line in proc.stdout.splitlines()) == 2


def test_builtin_suites_are_the_papers_tables():
    from scion.evaluate.suites import builtin_suites, load_suite

    assert {"tinyllama", "inheritune-zeroshot", "inheritune-mmlu"} <= set(builtin_suites())
    tiny = load_suite("tinyllama")
    assert tiny.names == ["hellaswag", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "boolq", "piqa"]
    assert set(tiny.shots.values()) == {0}
    assert tiny.metrics == {"hellaswag": "acc_norm", "openbookqa": "acc_norm", "winogrande": "acc",
                            "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "piqa": "acc_norm"}
    zero = load_suite("inheritune-zeroshot")
    assert zero.names == ["arc_easy", "lambada_openai", "sciq", "hellaswag", "piqa"]
    assert set(zero.shots.values()) == {0}
    mmlu = load_suite("inheritune-mmlu")
    assert mmlu.names == zero.names + ["mmlu"]
    assert mmlu.shots == {**zero.shots, "mmlu": 5}


def test_builtin_suites_name_tasks_the_harness_knows():
    from scion.evaluate.harness import task_manager
    from scion.evaluate.suites import builtin_suites, load_suite

    names = sorted({t for s in builtin_suites() for t in load_suite(s).names})
    task_manager(names)  # raises ScionError naming any unknown task


@pytest.mark.parametrize("text, message", [
    ("tasks: []\n", "needs a `tasks:` list"),
    ("tasks:\n  - {task: a, shots: -1}\n", "shots must be a whole number"),
    ("tasks:\n  - {task: a}\n  - {task: a, shots: 5}\n", "listed twice"),
    ("tasks:\n  - {task: a, fewshot: 5}\n", "unknown key(s) fewshot"),
    ("title: [unclosed\n", "not valid YAML"),
])
def test_a_bad_suite_file_is_one_line_naming_it(tmp_path, text, message):
    from scion.evaluate.suites import load_suite

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScionError, match=None) as e:
        load_suite(str(path))
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ScionError, match="built-in ones are .*tinyllama"):
        load_suite("no-such-suite")


def test_a_suite_runs_each_task_at_its_shots_over_checkpoints(facts_run, facts, run_scion, tmp_path):
    tasks = tmp_path / "suite-tasks"
    shutil.copytree(facts["tasks"], tasks)
    few = (tasks / "capitals.yaml").read_text().replace("task: scion_capitals", "task: scion_capitals_2shot")
    (tasks / "capitals-2shot.yaml").write_text(few + "fewshot_split: test\n")
    suite = tmp_path / "capitals-table.yaml"
    suite.write_text("title: Capitals table\nsource: a test\ninclude_path: suite-tasks\ntasks:\n"
                     "  - {task: scion_capitals, shots: 0}\n  - {task: scion_capitals_2shot, shots: 2, metric: acc}\n"
                     "  - {task: scion_rolling, shots: 0, metric: bits_per_byte}\n")
    out = tmp_path / "results.json"
    proc = run_scion("eval", facts_run, "--suite", suite, "--checkpoints", "all", "--batch-size", "4",
                     "--out", out, cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["num_fewshot"] == {"scion_capitals": 0, "scion_capitals_2shot": 2, "scion_rolling": 0}
    assert [r["step"] for r in results["rows"]] == [40, 80]
    for row in results["rows"]:
        assert row["n_shot"] == {"scion_capitals": 0, "scion_capitals_2shot": 2, "scion_rolling": 0}
        headline = row["scores"]["headline"]
        assert list(headline) == ["scion_capitals", "scion_capitals_2shot", "scion_rolling"]
        assert headline["scion_rolling"]["metric"] == "bits_per_byte"
        accuracies = [headline["scion_capitals"]["value"], headline["scion_capitals_2shot"]["value"]]
        assert row["scores"]["average"] == pytest.approx(sum(accuracies) / 2)
    lines = proc.stdout.splitlines()
    assert "Capitals table (a test)" in lines
    header = next(line for line in lines if line.startswith("| checkpoint"))
    assert "scion_capitals_2shot (acc, 2-shot) " in header and "scion_rolling (bits_per_byte) " in header
    assert sum(line.startswith("| step-") for line in lines) == 2
    refused = run_scion("eval", facts_run, "--suite", suite, "--num-fewshot", "1", check=False)
    assert refused.returncode == 2 and "drop --tasks and --num-fewshot" in refused.stderr


def test_a_task_whose_data_cannot_be_fetched_is_one_line(random_model, run_scion, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("task: scion_remote\ndataset_path: scion-tests/not-on-this-machine\n"
                                       "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\n"
                                       "doc_to_choice: choices\ndoc_to_target: 0\n")
    proc = run_scion("eval", random_model[2], "--tasks", "scion_remote", "--include-path", tasks, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "scion_remote" in line and "scion-tests/not-on-this-machine" in line and "--include-path" in line


# ---- the adapter computes exactly what the model does -----------------------------------


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    tok = tokenizer()
    run = make_run(tmp_path_factory.mktemp("run"), ModelConfig(**LLAMA, n_kv_head=2), tok)
    loaded = load_model(run)
    return loaded.model, loaded.tokenizer, run


def direct_logprob(model, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    targets = torch.tensor(ids[1:])
    return logp[-n_cont:].gather(-1, targets[-n_cont:, None]).sum().item()


def test_loglikelihood_is_the_models_log_probability(random_model):
    model, tok, _ = random_model
    lm = ScionLM(model, tok, batch_size=3, progress=False)
    long_context = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # over the 32-token context
    pairs = [("The quick brown", " fox"), ("Pack my box", " with five dozen"),
             ("Sphinx", " of black quartz"), (long_context, " judge"), ("", "naïve café")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got, strict=True):
        if ctx:
            whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
            ids, n = whole[-(model.cfg.max_seq_len + 1):], len(whole) - len(ctx_ids)
        else:
            ids, n = [tok.eos_id] + tok.encode(cont), len(tok.encode(cont))
        assert logprob == pytest.approx(direct_logprob(model, ids, n), abs=1e-4)
        assert isinstance(greedy, bool)


def test_rolling_loglikelihood_counts_every_token_once(random_model):
    model, tok, _ = random_model
    short = "Pack my box with five dozen"
    ids = tok.encode(short)
    lm = ScionLM(model, tok, batch_size=4, progress=False)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True)[0]
    assert got == pytest.approx(direct_logprob(model, [tok.eos_id] + ids, len(ids)), abs=1e-4)
    # A document several contexts long: the same total whatever the batching.
    long = [Instance("loglikelihood_rolling", {}, (TEXT * 3,), 0),
            Instance("loglikelihood_rolling", {}, (short,), 1)]
    one = ScionLM(model, tok, batch_size=1, progress=False).loglikelihood_rolling(long, disable_tqdm=True)
    many = lm.loglikelihood_rolling(long, disable_tqdm=True)
    assert one == pytest.approx(many, abs=1e-4) and math.isfinite(one[0]) and one[0] < got


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(random_model):
    model, tok, _ = random_model
    lm = ScionLM(model, tok, batch_size=2, progress=False)
    prompts = ["The quick", "Pack my", "Sphinx of"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6}), i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        expected = tok.decode(generate(model, ids, 6, temperature=0.0)[0, ids.size(1):].tolist())
        assert text == expected.split("\n\n")[0].split(tok.eos_token)[0]
    stop = got[0][2:4] if len(got[0]) >= 4 else None
    if stop:
        request = Instance("generate_until", {}, ("The quick", {"until": [stop], "max_gen_toks": 6}), 0)
        cut = lm.generate_until([request], disable_tqdm=True)[0]
        assert stop not in cut and got[0].startswith(cut)


# ---- data: loss, perplexity, bits per byte ---------------------------------------------


def test_data_scores_are_exact_on_raw_text(random_model, tmp_path):
    model, tok, _ = random_model
    (tmp_path / "notes.txt").write_text(TEXT * 2, encoding="utf-8")
    scores = evaluate_data(model, tok, [str(tmp_path / "notes.txt")], batch_size=2, progress=False)
    ids = [tok.eos_id] + tok.encode(TEXT * 2)  # prepare's reading: a document ends with EOS
    ids.append(tok.eos_id)
    total = 0.0
    for start in range(0, len(ids) - 1, model.cfg.max_seq_len):
        window = ids[start:start + model.cfg.max_seq_len + 1]
        total -= direct_logprob(model, window, len(window) - 1)
    assert scores.tokens == len(ids) - 1
    assert scores.bytes == len((TEXT * 2).encode("utf-8"))
    assert scores.loss == pytest.approx(total / scores.tokens, rel=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(scores.loss), rel=1e-6)
    assert scores.bits_per_byte == pytest.approx(total / math.log(2) / scores.bytes, rel=1e-5)


def test_a_data_sets_split_scores_as_its_text_does(random_model, tmp_path):
    """`--data hf:FOLDER --split test` streams that split: the same scores as its records in a
    JSONL file; `max_tokens` stops reading early and scores the same first tokens."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, tok, _ = random_model
    docs = [f"{TEXT} record {i}" for i in range(6)]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[:4]}), tmp_path / "hub" / "data" / "test-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[4:]}), tmp_path / "hub" / "data" / "test-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": ["unused"]}), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hub = f"hf:{tmp_path / 'hub'}"
    streamed = evaluate_data(model, tok, [hub], split="test", batch_size=2, progress=False)
    local = evaluate_data(model, tok, [str(tmp_path / "test.jsonl")], batch_size=2, progress=False)
    assert streamed == local and streamed.bytes == sum(len(d.encode()) for d in docs)
    first = evaluate_data(model, tok, [hub], split="test", max_tokens=20, batch_size=2, progress=False)
    assert first == evaluate_data(model, tok, [str(tmp_path / "test.jsonl")], max_tokens=20, batch_size=2,
                                  progress=False)
    assert first.tokens == 20
    with pytest.raises(ScionError, match=r"no split 'validation' \(splits: train, test\); set --split"):
        evaluate_data(model, tok, [hub], progress=False)


def test_data_prepared_with_another_tokenizer_is_refused(random_model, tmp_path):
    from scion.data.prepare import PrepareOptions, prepare

    model, tok, _ = random_model
    (tmp_path / "text").mkdir()
    for i in range(4):
        (tmp_path / "text" / f"{i}.txt").write_text(TEXT * 5, encoding="utf-8")
    other = tokenizer(vocab_size=280)
    opts = PrepareOptions(val_fraction=0.5, progress=False)
    prepare([str(tmp_path / "text")], other, tmp_path / "shards", opts)
    with pytest.raises(ScionError, match="prepared with another tokenizer"):
        evaluate_data(model, tok, [str(tmp_path / "shards")], progress=False)
    prepare([str(tmp_path / "text")], tok, tmp_path / "ours", opts)
    scores = evaluate_data(model, tok, [str(tmp_path / "ours")], progress=False)
    assert scores.tokens > 0 and math.isfinite(scores.loss)


# ---- bad input ---------------------------------------------------------------------------


def test_unknown_task_names_come_with_close_names():
    known = ["hellaswag", "hellaswag_ar", "arc_easy", "piqa"]
    message = unknown_task_message(["hellaswg", "zzzz"], known)
    assert "'hellaswg' (did you mean: hellaswag, hellaswag_ar?)" in message
    assert "'zzzz'" in message and "did you mean" not in message.split("'zzzz'")[1].split(";")[0]


@pytest.mark.slow
def test_eval_cli_refuses_an_unknown_task_with_close_names(random_model, run_scion):
    _, _, run = random_model
    proc = run_scion("eval", run, "--tasks", "hellaswg", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown task 'hellaswg' (did you mean: hellaswag")


def test_eval_cli_refuses_a_missing_include_path_and_no_work(random_model, run_scion, tmp_path):
    _, _, run = random_model
    proc = run_scion("eval", run, "--tasks", "x", "--include-path", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "--include-path must be a folder" in proc.stderr
    proc = run_scion("eval", run, check=False)
    assert proc.returncode == 2 and "give --tasks" in proc.stderr
