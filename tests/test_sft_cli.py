"""scion sft, scion chat and scion generate --chat as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from scion.run import load_model

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

KEYS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]
CODES = dict(zip(KEYS, "37160425", strict=True))
TRAIN_FILLERS = ["please tell:", "quick:", "hey,", "", "so", "and"]
HELD_OUT_FILLERS = ["now", "ok then"]  # never seen in training


def write_lookup_task(path, n: int, seed: int = 0, bad: bool = False):
    """Conversations asking for the code of a colour: a lookup the base model cannot know."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        key, filler = rng.choice(KEYS), rng.choice(TRAIN_FILLERS)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{filler} code of {key}?".strip()},
                        {"role": "assistant", "content": CODES[key]},
                    ]
                }
            )
        )
    if bad:
        lines[3] = json.dumps({"instruction": "code of red?"})  # no output
        lines[5] = "{truncated"
    path.write_text("\n".join(lines) + "\n")
    return path


def held_out_accuracy(run) -> float:
    from scion.sft.chat import ChatSession
    from scion.sft.template import BUILTIN
    from scion.sft.vocab import with_chat_tokens

    loaded = load_model(run)
    template = BUILTIN["chatml"]
    tokenizer = loaded.tokenizer
    if not tokenizer.chat_template:  # the base model: same prompt, tokens it has never seen
        tokenizer = with_chat_tokens(tokenizer, template.special_tokens, template.source)
        from scion.sft.vocab import fit_embeddings

        fit_embeddings(loaded.model, loaded.tokenizer.vocab_size, tokenizer.vocab_size)
    right = total = 0
    for filler in HELD_OUT_FILLERS:
        for key in KEYS:
            session = ChatSession(loaded.model, tokenizer, template, max_new_tokens=4, temperature=0)
            answer = "".join(session.reply(f"{filler} code of {key}?"))
            right += answer.strip() == CODES[key]
            total += 1
    return right / total


SFT_FLAGS = ["--log-every", "2", "--eval-every", "2", "--sample-every", "1000", "--progress", "lines"]


def in_process(*args) -> None:
    """`scion ARGS` in this process: the same command, without starting Python, torch and peft again."""
    from scion.cli.main import main

    assert main([str(a) for a in args]) == 0


def _resume_matches(run, steps: int) -> None:
    """A copy of the run without its last checkpoint, resumed, ends with the same weights."""
    copy = run.parent / (run.name + "-resumed")
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step-{steps:08d}")
    in_process("sft", "--resume", copy, "--progress", "lines")
    a = load_file(str(run / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"))
    b = load_file(str(copy / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_reports_bad_records_and_makes_a_chat_model(run_scion, tiny_run, tmp_path, capsys):
    data = write_lookup_task(tmp_path / "chats.jsonl", 40, bad=True)
    out = tmp_path / "sft"
    proc = run_scion("sft", tiny_run, "--data", data, "--out", out, "--max-steps", "4",
                     "--checkpoint-every", "2", *SFT_FLAGS)
    skipped = f"{data}:4: missing or non-string field(s) 'output'; {data}:6: not valid JSON"
    assert f"skipped 2 bad record(s): {skipped}" in proc.stderr
    report = json.loads((out / "sft-data.json").read_text())
    assert report["conversations"] == 38 and report["added_tokens"] == 2 and len(report["bad_records"]) == 2
    assert report["val_examples"] == 2  # the default 5% held out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics)
    loaded = load_model(out)
    base = load_model(tiny_run)
    assert loaded.config.model.vocab_size == max(base.config.model.vocab_size, base.tokenizer.vocab_size + 2)
    assert loaded.tokenizer.chat_template and loaded.tokenizer.backend.token_to_id("<|im_end|>") is not None
    transformers = pytest.importorskip("transformers")
    from scion.sft.template import BUILTIN, encode_chat

    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    chat = [{"role": "user", "content": "code of teal?"}, {"role": "assistant", "content": "2"}]
    ids = hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == encode_chat(BUILTIN["chatml"], chat, loaded.tokenizer)[0]
    in_process("generate", out, "--chat", "--prompt", "code of red?", "--max-new-tokens", "5",
               "--temperature", "0")
    answer = capsys.readouterr().out
    assert answer.endswith("\n") and "<|im_end|>" not in answer and "<|im_start|>" not in answer


def test_lora_checkpoints_hold_merged_weights_and_resume_exactly(tiny_run, tmp_path):
    pytest.importorskip("peft")
    data = write_lookup_task(tmp_path / "chats.jsonl", 30)
    out = tmp_path / "lora"
    in_process("sft", tiny_run, "--data", data, "--out", out, "--max-steps", "4", "--checkpoint-every", "2",
               "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--layout", "pad", *SFT_FLAGS)
    last = out / "checkpoints" / "step-00000004"
    adapters = load_file(str(last / "adapter.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    tuned, base = load_model(out), load_model(tiny_run)  # a plain model: the adapters are merged in
    q_tuned, q_base = tuned.model.blocks[0].attn.q_proj.weight, base.model.blocks[0].attn.q_proj.weight
    assert not torch.equal(q_tuned, q_base)
    torch.testing.assert_close(
        tuned.model.blocks[0].attn.k_proj.weight, base.model.blocks[0].attn.k_proj.weight
    )
    _resume_matches(out, 4)


def test_resume_keeps_the_options_the_run_started_with(tiny_run, tmp_path, capsys):
    from scion.cli.main import main
    from scion.sft.options import load_options

    data = write_lookup_task(tmp_path / "chats.jsonl", 12)
    out = tmp_path / "sft"
    in_process("sft", tiny_run, "--data", data, "--out", out, "--max-steps", "1", "--chat-template", "alpaca",
               "--lora-train-embeddings", "no", "--lora-targets", "q_proj,k_proj", *SFT_FLAGS)
    saved = load_options(out)
    assert (saved.template, saved.lora_train_embeddings, saved.lora_targets) == ("alpaca", False, ["q_proj", "k_proj"])
    capsys.readouterr()
    other = write_lookup_task(tmp_path / "other.jsonl", 12, seed=1)
    for flag, value in [("--chat-template", "chatml"), ("--lora-rank", "4"), ("--data", str(other))]:
        code = main(["sft", "--resume", str(out), flag, value])
        err = capsys.readouterr().err
        assert code == 2 and f"drop {flag}" in err and len(err.strip().splitlines()) == 1, (flag, err)
    assert main(["sft", "--resume", str(out), "--data", str(data), "--chat-template", "alpaca"]) == 0  # unchanged


def test_bad_input_gets_one_clear_line(tiny_run, tmp_path, capsys):
    from scion.cli.main import main  # in-process: the same one-line errors, without a slow start each

    def scion(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    data = write_lookup_task(tmp_path / "chats.jsonl", 20, bad=True)
    code, err = scion("sft", tiny_run, "--data", data, "--out", tmp_path / "x", "--bad-records", "error")
    assert code == 2 and f"{data}:4: missing or non-string field(s) 'output'" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    code, err = scion("sft", tiny_run, "--data", data, "--out", tmp_path / "y", "--chat-template", "vicuna")
    assert code == 2 and "unknown chat template 'vicuna'" in err
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare, ignore=shutil.ignore_patterns("tokenizer"))
    code, err = scion("sft", bare, "--data", data, "--out", tmp_path / "z")
    assert code == 2 and "has no tokenizer" in err and "Traceback" not in err
    code, err = scion("sft", tiny_run, "--out", tmp_path / "w")
    assert code == 2 and "needs --data" in err
    code, err = scion("sft", tiny_run, "--data", data, "--out", tiny_run)
    assert code == 2 and "already exists" in err and "--resume" in err
    code, err = scion("chat", tiny_run)
    assert code == 2 and "no chat template" in err
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    shutil.copy(data, hub / "train-00000-of-00001.jsonl")
    code, err = scion("sft", tiny_run, "--data", f"hf:{hub.parent}", "--split", "dev", "--out", tmp_path / "v")
    assert code == 2 and "no split 'dev' (splits: train); set --split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v").exists()


@pytest.fixture(scope="module")
def chat_run(run_scion, tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    data = write_lookup_task(folder / "chats.jsonl", 30)
    run_scion("sft", tiny_run, "--data", data, "--out", folder / "run", "--max-steps", "2", *SFT_FLAGS)
    return folder / "run"


def test_chat_in_a_terminal(chat_run, cache_dir):
    pexpect = pytest.importorskip("pexpect")
    from tests.conftest import scion_env

    args = ["-m", "scion", "chat", str(chat_run), "--max-new-tokens", "6", "--seed", "0"]
    child = pexpect.spawn(sys.executable, args, env=scion_env(cache_dir), encoding="utf-8", timeout=120)
    try:
        child.expect("you> ")
        assert "chatting with" in child.before
        child.sendline("code of red?")
        child.expect("assistant> ")
        child.expect("you> ")  # the streamed answer, then the next prompt
        assert "<|im_end|>" not in child.before
        child.sendline("/reset")
        child.expect("conversation forgotten")
        child.expect("you> ")
        child.sendeof()
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_fine_tuning_learns_a_task_the_base_model_cannot_do(run_scion, tiny_run, tmp_path):
    data = write_lookup_task(tmp_path / "lookup.jsonl", 400)
    out = tmp_path / "learned"
    run_scion("sft", tiny_run, "--data", data, "--out", out, "--max-steps", "60", "--lr", "3e-3",
              "--checkpoint-every", "60", "--eval-every", "30", "--sample-every", "1000",
              "--progress", "lines")
    base, tuned = held_out_accuracy(tiny_run), held_out_accuracy(out)
    assert base <= 0.2 and tuned >= 0.5, (base, tuned)
    val = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert val[-1] < val[0]
