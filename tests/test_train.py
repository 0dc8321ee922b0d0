import json
import math

import pytest
import torch
from safetensors.torch import load_file

from scion.checkpoint import folder as ckpt
from scion.config import ModelConfig, RunConfig, TrainConfig
from scion.pretrain import pretrain
from scion.train.loop import Trainer
from scion.train.optim import lr_at
from tests.conftest import PRECISIONS, TINY_ARGS

# Trains or runs at --precision auto: `make test-bf16` runs these again with auto forced to bf16.
pytestmark = pytest.mark.precision


def tiny_config(corpus, **train) -> RunConfig:
    cfg = RunConfig(
        model=ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128,
                          max_seq_len=64),
        train=TrainConfig(max_steps=12, micro_batch_size=4, warmup_steps=2, log_every=2, eval_every=4,
                          eval_batches=2, sample_every=1000, checkpoint_every=4, lr=3e-3, min_lr=3e-4),
    )
    cfg.data.path = [str(corpus)]
    cfg.data.val_fraction = 0.2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r], [(r["step"], r["val_loss"]) for r in records
                                                                      if "val_loss" in r]


def test_lr_schedule_warmup_then_cosine_by_optimizer_step():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)


def test_training_reduces_loss_and_writes_the_run_layout(tiny_run):
    train, val = losses(tiny_run)
    assert train[-1][1] < train[0][1]
    assert [s for s, _ in val] == [4, 8]
    for name in ("config.yaml", "metrics.jsonl", "tokenizer/tokenizer.json", "data.json"):
        assert (tiny_run / name).exists(), name
    steps = [r.step for r in ckpt.list_checkpoints(tiny_run)]
    assert steps == [4, 8]
    record = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_rss_GiB"} <= set(record)
    assert 0 < record["max_rss_GiB"] < 64  # the process's peak resident memory, in GiB


@pytest.mark.parametrize("precision", PRECISIONS)
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, corpus, cache_dir, run_scion, monkeypatch,
                                                          precision):
    """Bit for bit in either precision: bf16 autocast is as deterministic as fp32 on a CPU."""
    full, _, _ = pretrain(tiny_config(corpus, precision=precision), tmp_path / "full", resume=False, progress=False)

    # Stop the second run right after step 6, as a SIGTERM would; it saves a checkpoint there.
    original = Trainer._step

    def stop_after_six(self):
        out = original(self)
        if self.state.step == 6:
            self.stop_reason = "test stop"
        return out

    monkeypatch.setattr(Trainer, "_step", stop_after_six)
    part, state, _ = pretrain(tiny_config(corpus, precision=precision), tmp_path / "part", resume=False,
                              progress=False)
    assert state.step == 6
    monkeypatch.setattr(Trainer, "_step", original)

    # Resume in a fresh process, as a user would.
    run_scion("pretrain", "--resume", part)
    a = load_file(str(ckpt.list_checkpoints(full)[-1].path / "model.safetensors"))
    b = load_file(str(ckpt.list_checkpoints(part)[-1].path / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(full) == losses(part)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_accumulation_matches_a_bigger_micro_batch(tmp_path, corpus, cache_dir, monkeypatch, precision):
    """Two micro-batches of 4 give the gradient of one micro-batch of 8.

    fp32: gradients within 1e-4 relative, losses within 1e-5 and the weights after two AdamW steps
    within 1e-5. bf16: every product's output is rounded to 8 bits of mantissa, and a batch of 8 and
    two of 4 round differently, so each gradient tensor agrees to 2% in norm (a lost or doubly
    counted micro-batch is off by 50% or more) and losses to 1e-3. Weights after AdamW are not
    compared in bf16: its first update is about lr x sign(gradient), so a gradient element near
    zero that the rounding flips moves by up to 2 x lr whatever the accumulation does."""
    gradients = []  # [run][step]: the accumulated gradient before clipping, by parameter
    clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, *args, **kwargs):
        params = list(params)
        gradients[-1].append([p.grad.detach().clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    gradients.append([])
    big, _, _ = pretrain(tiny_config(corpus, max_steps=2, micro_batch_size=8, checkpoint_every=2,
                                     precision=precision), tmp_path / "big", resume=False, progress=False)
    gradients.append([])
    acc, _, trainer = pretrain(tiny_config(corpus, max_steps=2, micro_batch_size=4, tokens_per_step=8 * 64,
                                           checkpoint_every=2, precision=precision),
                               tmp_path / "acc", resume=False, progress=False)
    assert trainer.accum == 2 and trainer.precision == precision
    assert len(gradients[0]) == len(gradients[1]) == 2
    # The first step's gradients come from identical weights: the accumulation alone differs.
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for g_big, g_acc in zip(gradients[0][0], gradients[1][0], strict=True):
        assert _relative_error(g_acc, g_big) <= tolerance
    la, lb = losses(big)[0], losses(acc)[0]
    loss_tolerance = 1e-5 if precision == "fp32" else 1e-3
    assert all(math.isclose(x[1], y[1], rel_tol=loss_tolerance) for x, y in zip(la, lb, strict=True))
    if precision == "fp32":
        a = load_file(str(ckpt.list_checkpoints(big)[-1].path / "model.safetensors"))
        b = load_file(str(ckpt.list_checkpoints(acc)[-1].path / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_reset_optimizer_warns_and_continues_the_schedule(tmp_path, corpus, cache_dir, run_scion):
    out = tmp_path / "run"
    run_scion("pretrain", "--data", corpus, "--out", out, "--max-steps", "4", "--data.val-fraction", "0.2",
              *TINY_ARGS)
    proc = run_scion("pretrain", "--resume", out, "--max-steps", "6", "--reset-optimizer")
    assert "WITHOUT the optimizer" in proc.stderr
    train, _ = losses(out)
    assert train[-1][0] == 6


def test_generate_command_samples_with_a_seed(tiny_run, run_scion):
    a = run_scion("generate", tiny_run, "--prompt", "To be", "--max-new-tokens", "12", "--seed", "3").stdout
    b = run_scion("generate", tiny_run, "--prompt", "To be", "--max-new-tokens", "12", "--seed", "3").stdout
    greedy = run_scion("generate", tiny_run, "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0")
    assert a == b and a.startswith("To be") and len(a) > len("To be\n")
    assert greedy.stdout.startswith("To be")


@pytest.mark.slow
def test_generate_compile_samples_what_eager_decoding_samples(tiny_run, run_scion):
    args = ["generate", tiny_run, "--prompt", "To be", "--max-new-tokens", "20", "--seed", "5", "--num-samples", "2"]
    eager = run_scion(*args)
    compiled = run_scion(*args, "--compile")
    assert compiled.stdout == eager.stdout
    assert "compiling the decoding step" in compiled.stderr


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    weights = {"w": torch.ones(4)}
    first = ckpt.save_checkpoint(tmp_path, 1, 10, weights, None, {})
    assert ckpt.verify_checkpoint(first) is None

    # A crash while writing the next checkpoint leaves no folder that looks like a checkpoint.
    def boom(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(ckpt, "_sha256", boom)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path, 2, 20, weights, None, {})
    monkeypatch.undo()
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    # A checkpoint tampered with after saving no longer verifies, and resume skips it.
    second = ckpt.save_checkpoint(tmp_path, 2, 20, weights, None, {})
    (second / "model.safetensors").write_bytes(b"garbage")
    assert "checksum" in ckpt.verify_checkpoint(second)
    assert ckpt.find_resumable(tmp_path, warn=lambda m: None).step == 1


def test_retention_keeps_last_and_milestones(tmp_path):
    weights = {"w": torch.ones(2)}
    for step in range(1, 7):
        ckpt.save_checkpoint(tmp_path, step, step * 100, weights, None, {}, milestone=step == 2)
        ckpt.prune(tmp_path, keep_last=2)
    names = [r.path.name for r in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000002-200-tokens", "step-00000005", "step-00000006"]
