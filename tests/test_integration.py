"""Rooms working together as a user strings them: a Hugging Face model in, Inheritune, the
lazy-layer analysis and an export back out."""

import json

import pytest
import torch

from tests.interop_helpers import hf_llama, tokenizer

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision

pytest.importorskip("transformers")


def test_inherit_from_a_hugging_face_folder_then_analyse_and_export(tmp_path, corpus, run_scion):
    from transformers import AutoModelForCausalLM

    tok = tokenizer(320)
    reference = hf_llama(tmp_path / "hf", tok, vocab_size=320, num_hidden_layers=4, max_position_embeddings=64)
    out = tmp_path / "target"
    run_scion("inherit", "--reference", tmp_path / "hf", "--layers", "2", "--out", out, "--data", corpus,
              "--max-steps", "2", "--data.val-fraction", "0.2", "--micro-batch-size", "2", "--seq-len", "32",
              "--eval-batches", "1", "--sample-every", "1000")
    provenance = json.loads((out / "inherit.json").read_text())
    assert provenance["reference_layers"] == 4 and provenance["blocks_from_reference"] == [0, 1]

    run_scion("lazy", out, "--out", tmp_path / "lazy", "--data", corpus)
    report = json.loads((tmp_path / "lazy" / "lazy.json").read_text())
    assert len(json.dumps(report)) > 100

    run_scion("export", out, "--hf", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.num_hidden_layers == 2
    # Before training, the inherited blocks were the reference's; after two steps they moved a little.
    ref_q = reference.model.layers[0].self_attn.q_proj.weight
    new_q = exported.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(ref_q, new_q, atol=0.05) and not torch.equal(ref_q, new_q)
