"""SFT library: records, template rendering and labels, packing, vocabulary growth, LoRA, chat."""

from __future__ import annotations

import json
import os

import pytest
import torch

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.sft.batches import Example, SFTBatches, attention_mask, collate, make_examples, pack, sft_loss
from scion.sft.chat import ChatSession
from scion.sft.lora import apply_lora, merged_model
from scion.sft.records import read_records
from scion.sft.template import BUILTIN, IGNORE, SPECIAL, encode_chat, prompt_ids, render, resolve_template
from scion.sft.vocab import fit_embeddings, with_chat_tokens
from scion.tokenizer import train_bpe

CHATML = BUILTIN["chatml"]
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass, my friend?"},
    {"role": "assistant", "content": "Green, mostly\nin spring."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["What colour is the sky? Blue. And grass? Green, mostly in spring. You answer in one word."] * 20
    base = train_bpe(iter(texts), 300)
    return with_chat_tokens(base, CHATML.special_tokens, CHATML.source)


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=64, **kw
    )
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


# ---- labels ---------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    ids, labels = encode_chat(CHATML, CONVERSATION, tokenizer)
    # An oracle built without the template engine: each piece of ChatML tokenized on its own,
    # trained where it is an assistant's content and the <|im_end|> that closes it.
    expected_ids, expected_mask = [], []
    for m in CONVERSATION:
        pieces = [
            (f"<|im_start|>{m['role']}\n", False),
            (m["content"] + "<|im_end|>", m["role"] == "assistant"),
            ("\n", False),
        ]
        for text, trained in pieces:
            piece = tokenizer.encode(text)
            expected_ids += piece
            expected_mask += [trained] * len(piece)
    assert ids == expected_ids
    assert [label != IGNORE for label in labels] == expected_mask
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(trained) == "Blue.<|im_end|>Green, mostly\nin spring.<|im_end|>"


def test_train_on_everything(tokenizer):
    ids, labels = encode_chat(CHATML, CONVERSATION, tokenizer, train_on="all")
    assert labels == ids


def test_inputs_and_targets_shift_within_a_conversation(tokenizer):
    (example,), report = make_examples([CONVERSATION], CHATML, tokenizer, max_len=512)
    ids, labels = encode_chat(CHATML, CONVERSATION, tokenizer)
    assert example.inputs == ids[:-1] and example.targets == labels[1:]
    assert report.trained_tokens == sum(t != IGNORE for t in example.targets)


def test_template_matches_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    out = hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels = encode_chat(CHATML, CONVERSATION, tokenizer)
    assert list(out["input_ids"]) == ids
    assert [bool(m) for m in out["assistant_masks"]] == [label != IGNORE for label in labels]
    prompt = hf.apply_chat_template(
        CONVERSATION[:2], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert list(prompt["input_ids"]) == prompt_ids(CHATML, CONVERSATION[:2], tokenizer)
    alpaca = with_chat_tokens(tokenizer, (), BUILTIN["alpaca"].source)
    alpaca.save(tmp_path / "alpaca")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "alpaca"))
    assert (
        list(hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
        == encode_chat(BUILTIN["alpaca"], CONVERSATION, alpaca)[0]
    )


# The templates as the models ship them in tokenizer_config.json (the tool-calling branches left
# out): no generation marks. MARK turns each into the marked template transformers needs for
# `return_assistant_tokens_mask`, the reference scion's unmarked labels must equal.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}@{{- message.content + '<|im_end|>' }}#{{- '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "@{{- message['content'] | trim + '<|eot_id|>' }}#"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])
def test_a_models_own_unmarked_template_labels_its_assistant_turns_as_transformers_masks_them(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from scion.sft.template import template_of

    source = {"qwen2.5": QWEN25, "llama3": LLAMA3}[family]
    shipped = source.replace("@", "").replace("#", "")
    marked = source.replace("@", "{% generation %}").replace("#", "{% endgeneration %}")
    texts = ["What colour is the sky? Blue. And grass? Green, mostly in spring. You answer in one word."] * 20
    base = train_bpe(iter(texts), 300)
    special = ("<|begin_of_text|>",) if family == "llama3" else ()
    tok = with_chat_tokens(base, special + tuple(dict.fromkeys(SPECIAL.findall(shipped))), shipped)
    if family == "llama3":
        tok = type(tok)(tok.backend, tok.eos_token, "<|begin_of_text|>", chat_template=shipped)
    template = template_of(tok)
    assert not template.marks_generation
    ids, labels = encode_chat(template, CONVERSATION, tok)

    tok.save(tmp_path / "shipped")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "shipped"))
    assert list(hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]) == ids
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(prompt["input_ids"]) == prompt_ids(template, CONVERSATION[:2], tok)
    masks = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, chat_template=marked,
                                   return_assistant_tokens_mask=True)["assistant_masks"]
    assert [bool(m) for m in masks] == [label != IGNORE for label in labels]
    assert sum(label != IGNORE for label in labels) > 4  # both answers and their end-of-turn tokens
    assert template.stop_token == ("<|eot_id|>" if family == "llama3" else "<|im_end|>")


def test_unknown_template_and_template_files(tokenizer, tmp_path):
    with pytest.raises(ScionError, match="unknown chat template 'vicuna'"):
        resolve_template("vicuna", tokenizer)
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}")
    template = resolve_template(str(plain), tokenizer)
    assert template.special_tokens == ("<|turn|>",)
    # No generation marks: the assistant turns are found by rendering the conversation up to each
    # (this template has no generation prompt, so a turn includes its marker).
    tok = with_chat_tokens(tokenizer, template.special_tokens, template.source)
    ids, labels = encode_chat(template, CONVERSATION, tok)
    assert tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE]) == \
        "<|turn|>Blue.<|turn|>Green, mostly\nin spring."
    # A template that rewrites what it rendered before (here: a count of the turns up front) cannot.
    counting = tmp_path / "counting.jinja"
    counting.write_text("{{ messages|length }}{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}")
    with pytest.raises(ScionError, match="--train-on all"):
        encode_chat(resolve_template(str(counting), tokenizer), CONVERSATION, tok)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ScionError, match="not a valid Jinja template"):
        resolve_template(str(broken), tokenizer)


def test_rendering_records_generation_spans(tokenizer):
    text, spans = render(CHATML, CONVERSATION, tokenizer)
    assert [text[a:b] for a, b in spans] == ["Blue.<|im_end|>", "Green, mostly\nin spring.<|im_end|>"]


# ---- records --------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_record_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    _jsonl(tmp_path / "a.jsonl", [alpaca, chat, sharegpt])
    pq.write_table(pa.Table.from_pylist([chat, chat]), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([alpaca], indent=2))  # alpaca_data.json is one array
    records = read_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.json")])
    assert records.conversations[0] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert records.conversations[1] == chat["messages"]
    assert records.conversations[2] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert records.conversations[3:5] == [chat["messages"]] * 2 and not records.bad
    assert records.conversations[5] == records.conversations[0]


def test_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records = read_records([str(tmp_path / "ds")])
    assert [c[1]["content"] for c in records.conversations] == ["0", "1", "2"]


def test_bad_records_are_counted_with_their_line_or_refused(tmp_path):
    good = {"instruction": "a", "output": "b"}
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            good,
            {"instruction": "no answer"},
            "{not json",
            good,
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"text": "plain"},
        ],
    )
    records = read_records([str(path)], "skip")
    assert len(records.conversations) == 2
    assert [b.where for b in records.bad] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "'output'" in records.bad[0].reason and "not valid JSON" in records.bad[1].reason
    assert "no assistant turn" in records.bad[2].reason
    with pytest.raises(ScionError, match=rf"{path.name}:2: missing or non-string field\(s\) 'output'"):
        read_records([str(path)], "error")


def test_too_long_conversations_are_truncated_or_dropped(tokenizer):
    long = [{"role": "user", "content": "sky " * 5}, {"role": "assistant", "content": "Blue. " * 40}]
    short = CONVERSATION[1:3]
    examples, report = make_examples([long, short], CHATML, tokenizer, max_len=48, too_long="truncate")
    assert report.truncated == [0] and len(examples) == 2 and len(examples[0]) == 48
    examples, report = make_examples([long, short], CHATML, tokenizer, max_len=48, too_long="drop")
    assert report.dropped_long == [0] and len(examples) == 1
    question_only = [{"role": "user", "content": "sky " * 60}, {"role": "assistant", "content": "Blue."}]
    examples, report = make_examples([question_only], CHATML, tokenizer, max_len=48)
    assert report.no_target == [0] and not examples


# ---- packing ----------------------------------------------------------------------------------------


def test_pack_fills_rows_without_overflow():
    lengths = [5, 9, 3, 7, 2, 8, 1, 6, 4, 10]
    rows = pack(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 5  # 55 tokens in rows of 12: best-fit needs the minimum


@pytest.mark.parametrize("position", ["rope", "learned"])  # LLaMA and GPT-2 style models
def test_packed_conversations_do_not_see_each_other(position):
    g = torch.Generator().manual_seed(0)
    model = tiny_model(50, position=position)

    def example(n):
        ids = torch.randint(0, 50, (n + 1,), generator=g).tolist()
        return Example(ids[:-1], ids[1:])

    a, b, c = example(7), example(11), example(5)
    packed = collate([[a, b, c]], pad_id=0, packed=True)
    assert packed["positions"][0, :23].tolist() == list(range(7)) + list(range(11)) + list(range(5))
    assert packed["targets"][0, :23].tolist() == a.targets + b.targets + c.targets

    def logits(batch):
        with torch.no_grad():
            return model(
                batch["inputs"], doc_mask=attention_mask(batch["doc_ids"]), positions=batch["positions"]
            )

    together = logits(packed)
    for ex, start in ((a, 0), (b, 7), (c, 18)):
        alone = model(torch.tensor([ex.inputs]))
        torch.testing.assert_close(together[0, start : start + len(ex)], alone[0], rtol=1e-5, atol=1e-5)
    b2 = Example([(t + 1) % 50 for t in b.inputs], b.targets)
    changed = logits(collate([[a, b2, c]], pad_id=0, packed=True))
    assert torch.equal(changed[0, :7], together[0, :7]) and torch.equal(changed[0, 18:23], together[0, 18:23])
    assert not torch.allclose(changed[0, 7:18], together[0, 7:18])
    # The loss of a packed row is the loss of its conversations, token for token.
    loss = sft_loss(model, packed)
    flat = torch.cat([model(torch.tensor([e.inputs]))[0] for e in (a, b, c)])
    expected = torch.nn.functional.cross_entropy(flat, torch.tensor(a.targets + b.targets + c.targets))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_batches_are_a_function_of_the_sample_number():
    examples = [Example(list(range(n)), list(range(n))) for n in (5, 9, 3, 7, 2, 8, 1, 6)]
    one = SFTBatches(examples, 12, seed=3, pad_id=0, packed=True)
    two = SFTBatches(examples, 12, seed=3, pad_id=0, packed=True)
    for start in (0, 2, len(one) + 1, 5 * len(one)):  # across epochs, in any order
        x, y = one.batch(start, 2), two.batch(start, 2)
        assert all(torch.equal(x[k], y[k]) for k in x)
    padded = SFTBatches(examples, 12, seed=3, pad_id=0, packed=False).batch(0, 3)
    assert set(padded) == {"inputs", "targets"} and padded["inputs"].size(0) == 3


# ---- vocabulary and LoRA ---------------------------------------------------------------------------


def test_new_tokens_get_mean_rows_and_the_vocab_grows():
    model = tiny_model(40)
    old = model.embed.weight[:30].clone(), model.lm_head.weight[:30].clone()
    assert fit_embeddings(model, 30, 36) is False  # rows 30..39 exist (padding): no growth
    torch.testing.assert_close(model.embed.weight[33], old[0].mean(0))
    assert fit_embeddings(model, 36, 44) is True
    assert (
        model.cfg.vocab_size == 44 and model.embed.weight.shape[0] == 44 and model.lm_head.out_features == 44
    )
    torch.testing.assert_close(model.lm_head.weight[:30], old[1])
    torch.testing.assert_close(model.lm_head.weight[43], model.lm_head.weight[:36].mean(0))
    tied = tiny_model(40, tie_embeddings=True)
    fit_embeddings(tied, 40, 42)
    assert tied.lm_head.weight is tied.embed.weight and tied.embed.weight.shape[0] == 42


def test_lora_before_and_after_merge_gives_the_same_logits():
    pytest.importorskip("peft")
    model = tiny_model(50)
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randint(0, 50, (2, 16), generator=g)
    adapted = model(x)
    merged = merged_model(model)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiny_model(50)(x), adapted, atol=1e-3)
    assert set(model.state_dict()) == set(tiny_model(50).state_dict())  # what checkpoints hold
    with pytest.raises(ScionError, match="unknown LoRA target"):
        apply_lora(tiny_model(50), 4, 8, ["qkv"])


# ---- chat ---------------------------------------------------------------------------------------------


def test_chat_drops_the_oldest_turns_to_fit_the_context(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    session = ChatSession(model, tokenizer, CHATML, system="Be brief.", max_new_tokens=4, temperature=0)
    for question in ["What colour is the sky?", "And grass?", "Why so?", "In spring?"]:
        "".join(session.reply(question))
        ids = prompt_ids(CHATML, session._messages(session.history), tokenizer)
        assert len(ids) <= session.context
    assert session.dropped_turns > 0
    assert session._messages(session.history)[0]["role"] == "system"
    with pytest.raises(ScionError, match="write a shorter one"):
        session.prompt("sky " * 100)


def test_hub_data_sets_are_streamed_by_config_and_split(tmp_path, monkeypatch):
    """hf:NAME[:CONFIG] and --split, as `scion prepare` reads them; a folder laid out as the hub
    lays one out stands in for the hub. The older hf:NAME:SPLIT still reads that split."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = tmp_path / "hub-copy"
    (hub / "data").mkdir(parents=True)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    other = [{"role": "system", "content": "be brief"}, *chat]
    pq.write_table(pa.table({"messages": [chat, chat]}), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"messages": [other]}), hub / "data" / "train-00001-of-00002.parquet")
    no = [{"role": "user", "content": "say no"}, {"role": "assistant", "content": "no"}]
    pq.write_table(pa.table({"messages": [no]}), hub / "data" / "test-00000-of-00001.parquet")

    records = read_records([f"hf:{hub}"])
    assert records.conversations == [chat, chat, other]
    assert records.sources == [f"hf:{hub}"]
    assert read_records([f"hf:{hub}"], split="test").conversations[0][1]["content"] == "no"
    assert read_records([f"hf:{hub}:test"]).conversations == read_records([f"hf:{hub}"], split="test").conversations
    with pytest.raises(ScionError, match=r"hf:.*hub-copy:validation: no config 'validation'"):
        read_records([f"hf:{hub}:validation"])
    with pytest.raises(ScionError, match=r"no split 'validation' \(splits: train, test\); set --split"):
        read_records([f"hf:{hub}"], split="validation")

    configs = tmp_path / "configs"  # the layout push_to_hub writes for two configs
    for name, answer in (("short", "a"), ("long", "a b c")):
        (configs / name).mkdir(parents=True)
        pq.write_table(pa.table({"instruction": ["q"], "output": [answer]}),
                       configs / name / "train-00000-of-00001.parquet")
    assert read_records([f"hf:{configs}:long"]).conversations[0][1]["content"] == "a b c"

    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "q", "output": "t"}]),
                          "dev": datasets.Dataset.from_list([{"instruction": "q", "output": "d"}])}).save_to_disk(saved)
    assert read_records([str(saved)], split="dev").conversations[0][1]["content"] == "d"
    assert read_records([f"hf:{saved}"], split="dev").conversations[0][1]["content"] == "d"
    with pytest.raises(ScionError, match=r"no 'test' split \(has train, dev\); set --split"):
        read_records([str(saved)], split="test")


def test_a_hub_data_set_offline_is_one_line(tmp_path):
    """In a fresh process (datasets reads HF_*_OFFLINE when imported): the line that names the
    data set and the download that fixes it, as `scion prepare` gives it."""
    import subprocess
    import sys

    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    code = ("from scion.errors import ScionError\nfrom scion.sft.records import read_records\n"
            "try:\n    read_records(['hf:someone/no-such-chats'])\nexcept ScionError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("hf:someone/no-such-chats: the data set is not available offline"), out
    assert "hf download --repo-type dataset someone/no-such-chats" in out


def test_a_hugging_face_source_needs_the_interop_package(tmp_path, monkeypatch):
    import sys

    from scion.sft.recipe import load_source

    monkeypatch.setitem(sys.modules, "scion.interop", None)  # as in an installation without it
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ScionError, match="scion.interop is missing"):
        load_source(str(tmp_path), "cpu")
