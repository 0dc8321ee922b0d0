"""The memory plan (scion.train.memory) and the way out of out-of-memory: the plan's terms equal
bytes counted by hand; a run that cannot fit is refused in one line with the fix and writes
nothing, and --force-memory runs it; an out-of-memory in a step (injected with SCION_FAULT_OOM)
stops with one line and the last checkpoint intact, or with --on-oom halve carries on and ends
with the weights of a run that used the smaller micro-batch from the start."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scion import checkpoint as ckpt
from scion.config import ModelConfig, TrainConfig, preset
from scion.train.memory import (
    CPU_CKPT_HEAP,
    GiB,
    Shapes,
    activation_bytes_per_token,
    fixes,
    largest_micro_batch,
    named_device,
    plan_memory,
)
from tests.conftest import TINY_ARGS, scion_env

# TINY_ARGS's model, counted by hand: embedding 512 x 64; per block q 64x64, k and v 64x32 (2 KV
# heads of 16), o 64x64, gate, up and down 64x128, two norms of 64; final norm 64; head 64 x 512.
TINY = ModelConfig(name="t", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128,
                   max_seq_len=64)
RUN_ARGS = [*TINY_ARGS, "--data.val-fraction", "0.2"]
BLOCK = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
PARAMS = 512 * 64 + 2 * BLOCK + 64 + 64 * 512


def test_shapes_are_counted_like_the_model():
    s = Shapes.of(TINY)
    assert (s.params, s.block_params, s.head_params, s.embed_params) == (PARAMS, BLOCK, 64 * 512, 512 * 64)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_gradients_and_adamw_state_in_bytes(precision):
    # scion keeps fp32 weights, gradients and moments in both precisions (bf16 is autocast).
    p = plan_memory(TINY, TrainConfig(), precision=precision, runtime=0.0)
    assert (p.weights, p.gradients, p.optimizer) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)


def test_fsdp_shards_weights_gradients_and_optimizer_state_ddp_doubles_gradients():
    fsdp = plan_memory(TINY, TrainConfig(parallel="fsdp"), precision="fp32", ranks=2, runtime=0.0)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (2 * PARAMS, 2 * PARAMS, 4 * PARAMS)
    ddp = plan_memory(TINY, TrainConfig(parallel="ddp"), precision="fp32", ranks=2, runtime=0.0)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * PARAMS, 8 * PARAMS, 8 * PARAMS)


def test_lora_only_adapters_keep_gradients_and_optimizer_state():
    adapters = 2 * 2 * (8 * 64 + 8 * 64)  # rank 8 on q_proj and v_proj of 2 blocks (q: 64->64, v: 64->32)
    p = plan_memory(TINY, TrainConfig(), precision="fp32", trainable=adapters, runtime=0.0)
    assert (p.weights, p.gradients, p.optimizer) == (4 * PARAMS, 4 * adapters, 8 * adapters)


def test_activations_grow_with_the_micro_batch_and_shrink_with_checkpointing():
    t = TrainConfig(micro_batch_size=4)
    one, two = (plan_memory(TINY, t, precision="fp32", micro_batch=m, runtime=0.0) for m in (1, 2))
    assert two.activations == 2 * one.activations and two.logits == 2 * one.logits
    # Checkpointing keeps each block's input and recomputes one block at a time.
    deep = dataclasses.replace(TINY, n_layer=8)
    full, ckpt_ = (plan_memory(deep, dataclasses.replace(t, activation_checkpointing=c), precision="fp32",
                               micro_batch=2, runtime=0.0) for c in (False, True))
    assert ckpt_.activations < full.activations / 2
    # bf16 autocast keeps the matmul weights' bf16 copies (all but the embedding) once per micro-batch.
    bf16 = plan_memory(TINY, t, precision="bf16", micro_batch=2, runtime=0.0)
    assert bf16.activations > 2 * (PARAMS - 512 * 64)


def test_checkpointed_heap_slack_counts_what_glibc_serves_from_its_heap():
    # With checkpointing on a CPU the allocator term is CPU_CKPT_HEAP times the blocks' inputs and
    # one block's tensors, those under glibc's 32 MiB mmap ceiling. TINY's block, fp32, per token:
    # two norms of [input, x/rms, statistics, output] (256, 256, 4, 256 bytes), q 256, k 128,
    # v 128, attention output 256, log-sum-exp 16, and SwiGLU's four [128] tensors (512 each).
    per_block = activation_bytes_per_token(TINY, "fp32")
    assert per_block == 2 * (3 * 256 + 4) + 256 + 128 + 128 + 256 + 16 + 4 * 512
    t = TrainConfig(activation_checkpointing=True, seq_len=64)
    few = plan_memory(TINY, t, precision="fp32", micro_batch=4, runtime=0.0)  # 256 tokens: all on the heap
    assert few.allocator == CPU_CKPT_HEAP * 256 * (2 * 4 * 64 + per_block)
    # At 65,536 tokens the MLP's tensors are 32 MiB each and mapped on their own; the rest (16 MiB
    # and under) is still the heap's.
    many = plan_memory(TINY, t, precision="fp32", micro_batch=1024, runtime=0.0)
    assert many.allocator == CPU_CKPT_HEAP * 65536 * (2 * 4 * 64 + per_block - 4 * 512)
    # The slack is still resident at the optimizer step; a GPU's peak has none.
    assert many.total == many.weights + many.optimizer + max(many.gradients, many.activations + many.logits
                                                             + 4 * 64 * 512) + many.allocator
    assert plan_memory(TINY, t, precision="fp32", micro_batch=1024, device_kind="cuda").allocator == 0
    # FSDP gathers the root and the blocks whole and frees them again, block by block: heap churn too.
    fsdp = plan_memory(TINY, dataclasses.replace(t, parallel="fsdp"), precision="fp32", ranks=2, micro_batch=4,
                       runtime=0.0)
    assert fsdp.allocator - few.allocator == pytest.approx(CPU_CKPT_HEAP * 4 * (PARAMS - 2 * BLOCK + 3 * BLOCK))


def test_the_largest_micro_batch_that_fits_fits_and_the_next_does_not():
    t = TrainConfig(micro_batch_size=4096)
    available = 0.5 * GiB
    m = largest_micro_batch(TINY, t, available, precision="fp32", runtime=0.0)
    assert m > 1
    assert plan_memory(TINY, t, precision="fp32", micro_batch=m, runtime=0.0).total <= available
    assert plan_memory(TINY, t, precision="fp32", micro_batch=m + 1, runtime=0.0).total > available
    assert f"--micro-batch-size {m}" in fixes(TINY, t, available, precision="fp32", runtime=0.0)


def test_a_named_device_and_ranks_size_a_cluster_job():
    from scion.config import preset

    cfg = preset("llama2-7b")
    kind, h100 = named_device("h100-80gb")
    one = plan_memory(cfg.model, cfg.train, precision="bf16", device_kind=kind)
    assert one.total > h100
    found = fixes(cfg.model, cfg.train, h100, precision="bf16", device_kind=kind)
    assert any(f.startswith("--parallel fsdp on") for f in found)


def test_scion_plan_prints_the_terms_and_the_largest_micro_batch(run_scion):
    out = run_scion("plan", "--preset", "tinyllama-1.1b", "--device", "h100-80gb", "--ranks", "8",
                    "--parallel", "fsdp").stdout
    for label in ("weights", "gradients", "optimizer state", "activations", "logits/loss", "peak per rank"):
        assert label in out
    assert "of 79.2 GiB: fits" in out and "largest micro-batch that fits: " in out
    small = run_scion("plan", "--preset", "llama2-7b", "--device", "l4-24gb").stdout
    assert "does NOT fit" in small
    bad = run_scion("plan", "--device", "tpu-9000", check=False)
    assert bad.returncode == 2 and "unknown device 'tpu-9000'" in bad.stderr


# ---- refusal before anything is written ---------------------------------------------------------


def test_a_run_that_cannot_fit_is_refused_with_the_fix_and_writes_nothing(run_scion, corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_scion("pretrain", "--data", corpus, "--out", out, *RUN_ARGS, "--micro-batch-size", "4096",
                     "--memory-limit", "1.0", check=False)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    # activations in fp32; under bf16 autocast they shrink and the fp32 logits lead
    assert "the largest term is activations" in error[0] or "the largest term is logits/loss" in error[0]
    assert "--micro-batch-size" in error[0] and "--activation-checkpointing" in error[0]
    assert "--force-memory" in error[0]
    assert not out.exists()


def test_the_7b_preset_is_refused_on_this_machine(run_scion, corpus, tmp_path):
    out = tmp_path / "big"
    proc = run_scion("pretrain", "--preset", "llama2-7b", "--data", corpus, "--out", out, check=False)
    assert proc.returncode == 2 and "the memory plan needs" in proc.stderr, proc.stderr
    assert not out.exists()


def test_force_memory_runs_anyway_and_the_plan_is_printed(run_scion, corpus, tmp_path):
    out = tmp_path / "forced"
    args = ["pretrain", "--data", corpus, "--out", out, *RUN_ARGS, "--max-steps", "2", "--memory-limit", "0.01"]
    assert run_scion(*args, check=False).returncode == 2
    assert not out.exists()
    proc = run_scion(*args, "--force-memory")
    assert "going on (--force-memory)" in proc.stderr
    assert "memory plan: " in proc.stderr and "activations" in proc.stderr
    assert ckpt.list_checkpoints(out)[-1].step == 2


# ---- out of memory during a step ---------------------------------------------------------------


def scion_with_oom(cache, fault: str, *args) -> subprocess.CompletedProcess:
    env = scion_env(cache)
    env["SCION_FAULT_OOM"] = fault
    return subprocess.run([sys.executable, "-m", "scion", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_out_of_memory_in_a_step_stops_with_one_line_and_the_checkpoint_intact(cache_dir, corpus, tmp_path):
    out = tmp_path / "oom"
    proc = scion_with_oom(cache_dir, "micro-step:5", "pretrain", "--data", corpus, "--out", out, *RUN_ARGS,
                          "--max-steps", "8", "--checkpoint-every", "2", "--eval-every", "100")
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert error[0].startswith("error: step 5: out of memory at micro-batch 4 (peak ")
    assert "step-00000004 is intact" in error[0] and "--micro-batch-size 2" in error[0]
    refs = ckpt.list_checkpoints(out)
    assert refs[-1].step == 4 and ckpt.verify_checkpoint(refs[-1].path) is None


@pytest.mark.parametrize("precision", ["fp32"])
def test_on_oom_halve_continues_and_matches_the_smaller_micro_batch_bit_for_bit(cache_dir, run_scion, corpus,
                                                                                tmp_path, precision):
    common = ["--data", corpus, *RUN_ARGS, "--precision", precision, "--max-steps", "4",
              "--checkpoint-every", "4", "--eval-every", "100", "--tokens-per-step", str(8 * 64)]
    halved = tmp_path / "halved"
    # The first step's second micro-batch fails: its first one's gradients are thrown away.
    proc = scion_with_oom(cache_dir, "micro-step:2", "pretrain", "--out", halved, *common,
                          "--micro-batch-size", "4", "--on-oom", "halve")
    assert proc.returncode == 0, proc.stderr
    assert "step 1: out of memory at micro-batch 4" in proc.stderr
    assert "micro-batch 2 x 4 accumulation" in proc.stderr
    plain = tmp_path / "plain"
    run_scion("pretrain", "--out", plain, *common, "--micro-batch-size", "2")
    a = load_file(ckpt.list_checkpoints(halved)[-1].path / "model.safetensors")
    b = load_file(ckpt.list_checkpoints(plain)[-1].path / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_long_context_that_cannot_fit_is_answered_with_a_shorter_one():
    # Qwen3-0.6B's 40,960-token context with its logits whole (in chunks, activation checkpointing
    # fits it) fits no micro-batch on a 24 GiB CPU; a shorter one does.
    cfg = preset("qwen3-0.6b")
    cfg.train.loss_chunk_tokens = 0
    available = 24 * GiB
    found = fixes(cfg.model, cfg.train, available, precision="fp32", runtime=0.0)
    assert len(found) == 1 and found[0].startswith("--seq-len ")
    seq = int(found[0].split()[1])
    shorter = dataclasses.replace(cfg.train, seq_len=seq, micro_batch_size=1)
    assert plan_memory(cfg.model, shorter, precision="fp32", runtime=0.0).total <= available
    longer = dataclasses.replace(shorter, seq_len=2 * seq)
    assert plan_memory(cfg.model, longer, precision="fp32", runtime=0.0).total > available
