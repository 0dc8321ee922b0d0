"""Hugging Face interop: import `LlamaForCausalLM` and `GPT2LMHeadModel` checkpoints into
scion, export scion runs to folders `transformers` loads, and `load_reference` for every
command that takes a model to start from or compare with. One state-dict adapter per family
(`llama.py`, `gpt2.py`); conversions are checked logit for logit against transformers."""

from scion.interop.convert import export_hf, import_run, load_hf, load_reference

__all__ = ["export_hf", "import_run", "load_hf", "load_reference"]
