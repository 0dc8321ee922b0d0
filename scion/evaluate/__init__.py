"""Evaluation: validation loss, perplexity and bits per byte (`perplexity`), and benchmark
tasks through lm-evaluation-harness on the in-memory model (`harness`)."""
