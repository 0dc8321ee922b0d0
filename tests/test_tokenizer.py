import json

import pytest

from scion.errors import ScionError
from scion.tokenizer import EOS, gpt2_tokenizer, load_tokenizer, train_bpe


def test_trained_bpe_round_trips_any_text(tmp_path):
    tok = train_bpe(iter(["hello world, hello there"] * 50), 300)
    assert 257 < tok.vocab_size <= 300
    text = "héllo wörld ✓ \t\n new"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    folder = tok.save(tmp_path / "tok")
    again = load_tokenizer(folder)
    assert again.encode(text) == tok.encode(text)
    assert again.eos_id == tok.eos_id == tok.backend.token_to_id(EOS)
    assert again.fingerprint() == tok.fingerprint()


def test_gpt2_tokenizer_is_available_offline():
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257
    assert tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids


def test_saved_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe(iter(["some text to learn from"] * 20), 280)
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.eos_token == EOS
    assert hf("some text", add_special_tokens=False)["input_ids"] == tok.encode("some text")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(ScionError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ScionError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ScionError, match="too small"):
        train_bpe(iter(["x"]), 10)


def test_tokenizer_train_command(tmp_path, corpus, run_scion):
    run_scion("tokenizer", "train", "--data", corpus, "--vocab-size", "400", "--out", tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS
    assert load_tokenizer(tmp_path / "tok").vocab_size == 400
