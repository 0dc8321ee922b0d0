"""Instruction tuning: instruction and conversation records, chat templates, assistant-only
labels, packing and padding into batches, and LoRA. Training itself is the one loop in
`scion.train.loop`, driven by `scion.sft.recipe`; this package knows nothing of pretraining data."""
