"""fp8 training (`--precision fp8`, scion/train/float8.py) without a float8 GPU.

The refusals are checked as they are. The rest runs torchao's float8 training in emulation
(SCION_FP8_EMULATE=1: the same casts and scales, the products in plain PyTorch), which is how
the conversion, the training step, the checkpoints and FSDP's float8 all-gather get tested on
a CPU; the GPU's own kernels are exercised by benchmarks/gpu_check.py on a lent GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scion.config import ModelConfig
from scion.errors import ScionError
from scion.model import Transformer
from scion.train.device import autocast, peak_flops, resolve_precision
from scion.train.float8 import EMULATE_ENV, check_supported, convert_to_float8
from scion.train.parallel import parallelize
from scion.train.world import World

CPU = torch.device("cpu")


def test_fp8_is_refused_on_a_cpu_with_the_fix():
    with pytest.raises(ScionError, match=r"compute capability 8.9 or later .*on cpu: use --precision bf16"):
        resolve_precision("fp8", CPU)


def test_fp8_is_refused_on_a_gpu_without_float8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    with pytest.raises(ScionError, match=r"NVIDIA A100-SXM4-40GB is 8.0: use --precision bf16"):
        check_supported(torch.device("cuda", 0))


def test_fp8_without_torchao_names_the_install_command(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")  # past the device check, to the library's
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(ScionError, match=r"torchao, which is not installed: pip install 'scion\[fp8\]'"):
        resolve_precision("fp8", CPU)


def test_fp8_refused_when_torchao_was_built_for_a_newer_torch(monkeypatch):
    torchao = pytest.importorskip("torchao")
    monkeypatch.setenv(EMULATE_ENV, "1")
    monkeypatch.setattr(torchao, "_skip_reason", "Skipping import of cpp extensions due to incompatible torch "
                        "version. Please upgrade to torch >= 2.11.0 (found 2.10.0).", raising=False)
    with pytest.raises(ScionError, match=r"too new for torch .*upgrade torch, or install the torchao release"):
        resolve_precision("fp8", CPU)


def test_fp8_on_the_command_line_is_one_line_and_exit_2(run_scion, tmp_path):
    proc = run_scion("pretrain", "--precision", "fp8", "--device", "cpu", "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("use --precision bf16"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_fp8_mfu_is_counted_against_the_bf16_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0), "fp8") == (989e12, "H200 bf16 datasheet peak")


# ---- emulated float8 training ---------------------------------------------------------------

# 48 = 3 heads of 16, one KV head: every attention projection converts; the SwiGLU's 72-wide
# hidden layer is no multiple of 16, so gate, up and down stay as they are, and so does lm_head.
ODD = ModelConfig(name="fp8-odd", vocab_size=256, n_layer=2, n_head=3, n_kv_head=1, d_model=48, ffn_hidden=72,
                  max_seq_len=32)
EVEN = ModelConfig(name="fp8-even", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128,
                   max_seq_len=32)


@pytest.fixture
def emulated(monkeypatch):
    pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install 'scion[fp8]')")
    monkeypatch.setenv(EMULATE_ENV, "1")


def built(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_conversion_skips_the_output_layer_and_dimensions_not_multiples_of_16(emulated):
    from torchao.float8.float8_linear import Float8Linear

    model = built(ODD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_float8(model)
    assert converted == [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == set(converted)
    after = model.state_dict()
    assert list(after) == list(before)  # the same names: checkpoints and export are unchanged
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_model_with_nothing_to_convert_is_refused(emulated):
    cfg = ModelConfig(name="fp8-none", vocab_size=256, n_layer=1, n_head=3, n_kv_head=1, d_model=24,
                      ffn_hidden=40, max_seq_len=16)
    with pytest.raises(ScionError, match="no Linear layer .* multiple of 16"):
        convert_to_float8(built(cfg))


def train_losses(precision: str, steps: int = 8) -> list[float]:
    """Losses of `steps` AdamW steps on one small batch (so that the loss falls), from the same
    initial weights, through `parallelize` as a run goes (fp8: converted there)."""
    model = built(EVEN)
    run = parallelize(model, "none", CPU, World(0, 1, 0), precision=precision)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, EVEN.max_seq_len + 1), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with autocast(CPU, precision):
            loss = run(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("reference", ["fp32", "bf16"])
def test_fp8_training_follows_the_reference_loss(emulated, reference):
    """8 steps from the same weights: the fp8 losses stay within 0.05 (about 1% of the loss, 4 times
    the gap measured) of fp32's and of bf16's, while the loss itself falls by a quarter; and they
    are not bf16's exactly, so the float8 products did run."""
    fp8, ref = train_losses("fp8"), train_losses(reference)
    assert max(abs(a - b) for a, b in zip(fp8, ref, strict=True)) < 0.05, (fp8, ref)
    assert fp8[-1] < 0.75 * fp8[0]
    assert fp8 != ref


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def test_an_fp8_run_saves_resumes_and_exports_like_a_bf16_run(emulated, run_scion, corpus, tiny_run, tmp_path):
    """`scion pretrain --precision fp8` (emulated): its checkpoints hold the parameters a bf16 run
    holds, under the same names and dtypes; it resumes; `scion export` writes a Llama that
    transformers loads."""
    from conftest import TINY_ARGS

    run = tmp_path / "fp8"
    run_scion("pretrain", "--data", corpus, "--out", run, "--max-steps", "2", "--checkpoint-every", "2",
              "--device", "cpu", "--precision", "fp8", "--data.val-fraction", "0.2", *TINY_ARGS)
    proc = run_scion("pretrain", "--resume", run, "--max-steps", "4", "--checkpoint-every", "2")
    assert "from step-00000002" in proc.stderr and "cpu fp8" in proc.stderr
    fp8, plain = checkpoint_weights(run, 4), checkpoint_weights(tiny_run, 8)
    assert {k: (v.shape, v.dtype) for k, v in fp8.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)

    run_scion("export", run, "--hf", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, fp8["blocks.0.attn.q_proj.weight"])


def _fp8_rank_main(rank: int, world_size: int, port: int, run_dir: str, parallel: str) -> None:
    import dataclasses

    from test_distributed import SEQ, NumberedSamples, _as_rank, tiny_config

    from scion.config import save_yaml
    from scion.pretrain import build_model, setup, train
    from scion.train.parallel import shutdown

    _as_rank(rank, world_size, port)
    cfg = tiny_config(parallel)
    cfg.train = dataclasses.replace(cfg.train, precision="fp8", max_steps=4)
    env = setup(cfg)
    if env.world.main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, Path(run_dir) / "config.yaml")
    data = NumberedSamples(cfg.model.vocab_size, SEQ)
    train(cfg, Path(run_dir), build_model(cfg, env.device), None, data, data.validation, env, progress=False)
    shutdown()


def test_fsdp_on_two_ranks_gathers_float8_weights_and_matches_one_process(emulated, tmp_path):
    """FSDP across 2 gloo ranks casts each weight to float8 before the all-gather, with one scale
    from the whole weight; the micro-batches are those of one process, so the losses match one
    unsharded fp8 process to 1e-4, and the sharded checkpoint's consolidated weights keep their
    names."""
    from test_distributed import losses, spawn_ranks

    spawn_ranks(2, _fp8_rank_main, str(tmp_path / "fsdp"), "fsdp")
    spawn_ranks(1, _fp8_rank_main, str(tmp_path / "single"), "none")
    single, sharded = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert single.keys() == sharded.keys() and single
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, rel=1e-4), key
    whole, plain = checkpoint_weights(tmp_path / "fsdp", 4), checkpoint_weights(tmp_path / "single", 4)
    assert whole.keys() == plain.keys()
    for name, value in plain.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-3, atol=1e-4)
