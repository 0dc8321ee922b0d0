"""The output layer and cross-entropy a chunk of tokens at a time (`scion.model.linear_cross_entropy`,
`--loss-chunk-tokens`) against the whole computation: the loss and the gradients of the last
hidden state, the head, the final norm and (tied) the embedding; chunks that do not divide the
tokens, a chunk whose targets are all ignored, every target ignored, no gradients (evaluation),
a frozen head, bf16 autocast, FSDP on 2 gloo ranks, a compiled step, `scion pretrain` end to end,
and the memory plan's logits term in bytes counted by hand.

Precision: in fp32 everything agrees to 2e-6 of the largest entry (the chunks only change the
order of the sums); under bf16 autocast to 1e-2 of it (the logits and their gradient are rounded
to bf16 in both computations, but the gradient of the mean is scaled before the rounding in one
and after it in the other)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from scion.config import ModelConfig, TrainConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.train.memory import plan_memory
from tests.conftest import PRECISIONS, TINY_ARGS
from tests.test_distributed import losses

pytestmark = pytest.mark.precision

CFG = ModelConfig(name="chunks", vocab_size=96, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=40)
BATCH = 2  # 80 tokens a micro-batch
TOLERANCE = {"fp32": 2e-6, "bf16": 1e-2}  # of the largest entry of each compared tensor


def model(tied: bool = False) -> Transformer:
    m = Transformer(dataclasses.replace(CFG, tie_embeddings=tied))
    m.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # train-like norm weights, so the norm's gradient is not trivially shaped
        m.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return m


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [2, 40]: flattened, targets 16..31 are all ignored (a whole chunk of 16),
    and every fifth one besides."""
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, CFG.vocab_size, (BATCH, CFG.max_seq_len), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (BATCH, CFG.max_seq_len), generator=g)
    flat = targets.view(-1)
    flat[16:32] = -100
    flat[::5] = -100
    return idx, targets


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = want.abs().max().clamp(min=1e-30)
    err = (got.float() - want.float()).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} is {err / scale:.3g} of the largest entry (allowed {rel})"


def output_pass(m: Transformer, h: torch.Tensor, targets: torch.Tensor, chunk: int, precision: str) -> dict:
    """Loss and gradients of `output_loss` (final norm, head, loss) from the hidden state `h`,
    the loss scaled by 2.5 before backward (as accumulation scales it) to test the backward's scaling."""
    m.zero_grad(set_to_none=True)
    m.loss_chunk_tokens = chunk
    h = h.detach().clone().requires_grad_()
    with autocast(precision):
        loss = m.output_loss(h, targets)
    (2.5 * loss).backward()
    out = {"loss": loss.detach(), "h": h.grad, "norm": m.norm.weight.grad}
    if m.lm_head.weight.requires_grad:
        out["lm_head"] = m.lm_head.weight.grad
    return out


def hidden() -> torch.Tensor:
    return torch.randn(BATCH, CFG.max_seq_len, CFG.d_model, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("chunk", [7, 16, 48])  # 80 tokens: 12 chunks (the last of 3), 5 chunks, 2 unequal
def test_chunks_give_the_loss_and_gradients_of_the_whole(precision, chunk):
    m, (_, targets) = model(), batch()
    whole = output_pass(m, hidden(), targets, 0, precision)
    chunked = output_pass(m, hidden(), targets, chunk, precision)
    assert whole.keys() == chunked.keys() == {"loss", "h", "norm", "lm_head"}
    for name, want in whole.items():
        assert_close(chunked[name], want, TOLERANCE[precision], name)
    assert chunked["h"].dtype == torch.float32 and chunked["lm_head"].dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tied_embeddings_collect_the_head_and_the_lookup_gradients(precision):
    """Through the whole model: the tied weight's gradient is the head's plus the embedding
    lookup's; every parameter's gradient matches."""
    idx, targets = batch()
    grads = {}
    for chunk in (0, 16):
        m = model(tied=True)
        m.loss_chunk_tokens = chunk
        assert m.lm_head.weight is m.embed.weight
        with autocast(precision):
            loss = m(idx, targets)
        loss.backward()
        grads[chunk] = {"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()}}
    assert "embed.weight" in grads[16] and "lm_head.weight" not in grads[16]  # one shared parameter
    for name, want in grads[0].items():
        assert_close(grads[16][name], want, TOLERANCE[precision], name)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_without_gradients_and_with_a_frozen_head(precision):
    """Evaluation (no autograd) gives the same loss; a frozen head (LoRA) gets no gradient and
    the hidden state's is unchanged."""
    m, (idx, targets) = model(), batch()
    with torch.no_grad(), autocast(precision):
        losses = []
        for chunk in (0, 16):
            m.loss_chunk_tokens = chunk
            losses.append(m(idx, targets))
    assert_close(losses[1], losses[0], TOLERANCE[precision], "loss without gradients")
    m.lm_head.weight.requires_grad_(False)
    whole, chunked = (output_pass(m, hidden(), targets, chunk, precision) for chunk in (0, 16))
    assert m.lm_head.weight.grad is None and chunked.keys() == {"loss", "h", "norm"}
    for name, want in whole.items():
        assert_close(chunked[name], want, TOLERANCE[precision], name)


def test_every_target_ignored_gives_what_cross_entropy_gives():
    """A mean over no tokens: nan, as F.cross_entropy's, and zero gradients."""
    m = model()
    targets = torch.full((BATCH, CFG.max_seq_len), -100)
    whole, chunked = (output_pass(m, hidden(), targets, chunk, "fp32") for chunk in (0, 16))
    assert whole["loss"].isnan() and chunked["loss"].isnan()
    for name in ("h", "norm", "lm_head"):
        assert torch.equal(whole[name], torch.zeros_like(whole[name])) and torch.equal(chunked[name], whole[name])


def test_the_chunk_size_is_a_training_setting(run_scion):
    assert TrainConfig().loss_chunk_tokens == Transformer(CFG).loss_chunk_tokens == 2048
    with pytest.raises(ScionError, match="loss_chunk_tokens must not be negative"):
        TrainConfig(loss_chunk_tokens=-1).validate(CFG)
    proc = run_scion("plan", "--loss-chunk-tokens", "-1", check=False)
    assert proc.returncode == 2 and "loss_chunk_tokens must not be negative" in proc.stderr


# ---- compiled --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_compiled_model_computes_the_chunks_as_the_eager_one():
    """`compile_blocks`: the chunks loop eagerly around a compiled step (a compiled loop would
    unroll); loss and gradients match the eager whole computation, in fp32 and bf16."""
    from scion.train.compile import compile_blocks

    idx, targets = batch()
    for precision in PRECISIONS:
        grads = []
        for compiled in (False, True):
            m = model(tied=True)
            if compiled:
                compile_blocks(m)
            m.loss_chunk_tokens = 0 if not compiled else 16
            with autocast(precision):
                loss = m(idx, targets)
            loss.backward()
            grads.append({"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()}})
        for name, want in grads[0].items():
            assert_close(grads[1][name], want, TOLERANCE[precision], f"{precision} {name}")


# ---- FSDP ------------------------------------------------------------------------------------


def _fsdp_rank(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from scion.train.parallel import init_distributed, parallelize, shutdown

    device = torch.device("cpu")
    world = init_distributed("fsdp", device)
    m = model(tied=True)
    parallelize(m, "fsdp", device, world)
    m.loss_chunk_tokens = 16
    idx, targets = batch()  # the same batch on both ranks: the averaged gradient is the batch's own
    loss = m(idx, targets)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.detach(), **grads}, out)
    shutdown()


def test_fsdp_gives_the_gradients_of_one_process(tmp_path):
    """FSDP2 gathers the head's weight (tied to the embedding) for the forward pass and hands it to
    the chunked loss; the gradients it reduces equal one process's whole computation (fp32)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_rank, args=(2, port, str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    m, (idx, targets) = model(tied=True), batch()
    m.loss_chunk_tokens = 0
    loss = m(idx, targets)
    loss.backward()
    want = {"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()}}
    assert sharded.keys() == want.keys()
    for name in want:
        assert_close(sharded[name], want[name], TOLERANCE["fp32"], name)


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pretraining_in_chunks_follows_the_whole_computation(run_scion, corpus, tmp_path, precision):
    """`scion pretrain` with 256-token micro-batches in chunks of 100 tokens and without chunks:
    the same training and validation losses over 8 steps, to 1e-6 in fp32 (the weights drift
    apart only by rounding; 1e-7 seen) and 1e-3 under bf16 (6e-5 seen)."""
    runs = {}
    for chunk in (0, 100):
        out = tmp_path / f"chunk{chunk}"
        run_scion("pretrain", "--data", corpus, "--out", out, *TINY_ARGS, "--max-steps", "8",
                  "--data.val-fraction", "0.2", "--precision", precision, "--loss-chunk-tokens", chunk)
        runs[chunk] = losses(out)
    assert runs[0].keys() == runs[100].keys() and len(runs[0]) >= 6
    rel = 1e-6 if precision == "fp32" else 1e-3
    for key, want in runs[0].items():
        assert runs[100][key] == pytest.approx(want, rel=rel), key


# ---- the memory plan -------------------------------------------------------------------------


def test_the_memory_plan_counts_one_chunk_of_logits():
    # TINY of tests/test_memory_plan.py: d 64, vocab 512, 64 tokens a sequence; micro-batch 4: 256 tokens.
    tiny = ModelConfig(name="t", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128,
                       max_seq_len=64)
    d, vocab, tokens = 64, 512, 256
    norm = tokens * (12 * d + 4)  # the final norm's saved input and statistics

    def logits(chunk: int, precision: str) -> float:
        t = TrainConfig(micro_batch_size=4, loss_chunk_tokens=chunk)
        return plan_memory(tiny, t, precision=precision, runtime=0.0).logits

    whole = norm + tokens * 12 * vocab  # fp32 log-softmax, the loss's and the logits' gradients
    assert logits(0, "fp32") == logits(256, "fp32") == logits(0, "bf16") == whole
    # kept for backward: the input's gradient (fp32 per token) and the weight's (fp32); one chunk's
    # fp32 logits and log-softmax, and its part of the weight's gradient (in the compute dtype)
    kept = tokens * 4 * d + 4 * vocab * d
    assert logits(100, "fp32") == norm + kept + 100 * vocab * 8 + vocab * d * 4
    assert logits(100, "bf16") == norm + kept + 100 * vocab * 8 + vocab * d * 2
    assert logits(100, "fp32") < 0.55 * whole  # even at 256 tokens and d_model 64


def test_scion_plan_shows_the_chunks_saving(run_scion):
    """tinyllama-1.1b at micro-batch 8 x 2048 tokens in bf16: the whole logits are 6.23 GiB of the
    plan (`--loss-chunk-tokens 0`), chunks of 2048 tokens (the default) about a fifth of that."""
    from scion.config import preset

    out = run_scion("plan", "--preset", "tinyllama-1.1b", "--device", "h100-80gb", "--micro-batch-size", "8",
                    "--loss-chunk-tokens", "0").stdout
    whole = float(next(line for line in out.splitlines() if "logits/loss" in line).split()[-2])
    cfg = preset("tinyllama-1.1b")
    chunked = plan_memory(cfg.model, dataclasses.replace(cfg.train, micro_batch_size=8), precision="bf16",
                          device_kind="cuda").logits / 2**30
    assert whole == pytest.approx(6.23, abs=0.01) and chunked == pytest.approx(1.35, abs=0.01)
