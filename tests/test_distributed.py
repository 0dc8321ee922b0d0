"""Data-parallel (DDP) and sharded (FSDP2) training on 2 CPU processes over gloo, sharded
checkpoints, and resuming across world sizes.

One module fixture trains the same tiny model for 6 steps in every layout (a single process,
2 ranks with DDP, 2 ranks with FSDP2 and activation checkpointing) and resumes from step 4 on
another world size (2 ranks -> 1, 1 -> 2). The tests then compare what those runs left on
disk. The 2-rank runs share one spawned process group, so the processes start once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from scion import checkpoint as ckpt
from scion.checkpoint import consolidate, load_sharded
from scion.config import ModelConfig, RunConfig, TrainConfig, save_yaml
from scion.errors import ScionError
from scion.model import Transformer
from scion.train.optim import build_optimizer

STEPS, RESUME_AT = 6, 4
MICRO, GLOBAL, SEQ = 2, 8, 16  # global batch 8 sequences: 4 micro-steps on 1 rank, 2 x 2 on 2 ranks


def tiny_config(parallel: str = "none", activation_checkpointing: bool = False,
                consolidated: str = "auto", compile: bool = False, hsdp_shard_size: int = 0) -> RunConfig:
    model = ModelConfig(name="tiny-test", vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                        ffn_hidden=64, max_seq_len=SEQ)
    train = TrainConfig(max_steps=STEPS, micro_batch_size=MICRO, tokens_per_step=GLOBAL * SEQ, lr=3e-3,
                        min_lr=3e-4, warmup_steps=2, log_every=1, eval_every=3, eval_batches=3,
                        checkpoint_every=2, keep_last=10, sample_every=1000, sample_prompts=[],
                        device="cpu", precision="fp32", parallel=parallel,
                        activation_checkpointing=activation_checkpointing, consolidated_weights=consolidated,
                        compile=compile, hsdp_shard_size=hsdp_shard_size)
    return RunConfig(model=model, train=train)


class NumberedSamples:
    """Token windows that are a function of the global sample number, like the real sampler;
    records which samples this rank read."""

    def __init__(self, vocab: int, seq_len: int, signal_at: int | None = None):
        self.vocab, self.seq_len, self.read = vocab, seq_len, []
        self.signal_at = signal_at  # send this process SIGTERM when it reads this sample

    def window(self, g: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.seq_len + 1,), generator=torch.Generator().manual_seed(g))

    def batch(self, start: int, size: int):
        self.read.extend(range(start, start + size))
        if self.signal_at is not None and start <= self.signal_at < start + size:
            os.kill(os.getpid(), signal.SIGTERM)
        data = torch.stack([self.window(g) for g in range(start, start + size)])
        return data[:, :-1], data[:, 1:]

    def validation(self):
        # 3 batches: on 2 ranks one rank has two and the other one, which must not hang FSDP.
        for i in range(3):
            data = torch.stack([self.window(10_000 + i * MICRO + j) for j in range(MICRO)])
            yield data[:, :-1], data[:, 1:]


def train_run(run_dir: str, parallel: str, resume: bool = False, activation_checkpointing: bool = False,
              consolidated: str = "auto", compile: bool = False, signal_at: tuple[int, int] | None = None,
              hsdp_shard_size: int = 0) -> None:
    """Train (or resume) a tiny run as `scion pretrain` does, on the world this process is in.
    `signal_at` = (rank, sample): that rank sends itself SIGTERM when it reads that sample."""
    from scion.pretrain import build_model, setup, train

    cfg = tiny_config(parallel, activation_checkpointing, consolidated, compile, hsdp_shard_size)
    env = setup(cfg)
    run_dir = Path(run_dir)
    if env.world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    model = build_model(cfg, env.device)
    rank = env.world.rank
    signal_sample = signal_at[1] if signal_at and signal_at[0] == rank else None
    data = NumberedSamples(cfg.model.vocab_size, SEQ, signal_sample)
    trainer = train(cfg, run_dir, model, None, data, data.validation, env, resume=resume, progress=False)
    (run_dir / f"read-rank{rank}.json").write_text(json.dumps(data.read))
    (run_dir / f"stop-rank{rank}.txt").write_text(trainer.stop_reason or "")


def _as_rank(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a rank."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    if world_size > 1:  # one process alone makes its group without a network (as without torchrun)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _rank_main(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    _as_rank(rank, world_size, port)
    from scion.train.parallel import shutdown

    for job in jobs:
        train_run(**job)
    shutdown()


def spawn_ranks(world_size: int, main, *args) -> None:
    """Run `main(rank, world_size, port, *args)` on `world_size` spawned processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(main, args=(world_size, port, *args), nprocs=world_size, join=True)


def run_on_ranks(world_size: int, jobs: list[dict]) -> None:
    """Run the jobs, in order, on `world_size` spawned processes sharing one gloo group."""
    spawn_ranks(world_size, _rank_main, jobs)


def resumable_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished run without its last checkpoint: it resumes from step RESUME_AT."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step-{STEPS:08d}")
    for f in dst.glob("read-rank*.json"):
        f.unlink()
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    names = ("single", "ddp", "fsdp", "single_to_2", "fsdp_to_1", "signalled", "single_to_1")
    r = {name: root / name for name in names}
    train_run(str(r["single"]), "none")
    resumable_copy(r["single"], r["single_to_2"])
    run_on_ranks(2, [
        dict(run_dir=str(r["ddp"]), parallel="ddp"),
        dict(run_dir=str(r["fsdp"]), parallel="fsdp", activation_checkpointing=True),
        dict(run_dir=str(r["single_to_2"]), parallel="fsdp", resume=True, consolidated="never"),
        # rank 1 alone is sent SIGTERM while it reads its part of step 3 (samples 16..23)
        dict(run_dir=str(r["signalled"]), parallel="fsdp", signal_at=(1, 2 * GLOBAL + GLOBAL // 2)),
    ])
    resumable_copy(r["fsdp"], r["fsdp_to_1"])
    train_run(str(r["fsdp_to_1"]), "none", resume=True)
    resumable_copy(r["single"], r["single_to_1"])
    train_run(str(r["single_to_1"]), "none", resume=True)
    return r


def losses(run: Path) -> dict[tuple[str, int], float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key in ("loss", "val_loss"):
            if key in rec:
                out[(key, rec["step"])] = rec[key]
    return out


def final_weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_close_weights(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def plain_model() -> Transformer:
    model = Transformer(tiny_config().model)
    model.init_weights()
    return model


# ---- training steps ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, layout):
    single, parallel = losses(runs["single"]), losses(runs[layout])
    assert single.keys() == parallel.keys()
    assert sum(k[0] == "loss" for k in single) == STEPS and sum(k[0] == "val_loss" for k in single) == 2
    for key, value in single.items():
        assert parallel[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert_close_weights(final_weights(runs["single"]), final_weights(runs[layout]))
    # Each rank read its own half of every global batch, and together all of it, once.
    reads = [json.loads((runs[layout] / f"read-rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == list(range(STEPS * GLOBAL))
    trainer = json.loads((runs[layout] / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["global_batch"] == GLOBAL
    assert trainer["samples"] == STEPS * GLOBAL


# ---- sharded checkpoints -------------------------------------------------------------------


def test_fsdp_checkpoint_is_sharded_verified_and_consolidated(runs):
    folder = runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}"
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "optimizer_groups.json",
            "model.safetensors", "trainer.json", "rng.pt", "checksums.json"} == names
    assert ckpt.verify_checkpoint(folder) is None
    sums = json.loads((folder / "checksums.json").read_text())
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= sums.keys()

    # The shards, read back in one process, are exactly the consolidated weights, and the
    # optimizer state comes back with them (AdamW moments for every parameter, step count).
    model = plain_model()
    optimizer = build_optimizer(model, tiny_config().train)
    load_sharded(folder, model, optimizer)
    whole = final_weights(runs["fsdp"])
    for name, tensor in ckpt.model_state(model).items():
        assert torch.equal(tensor, whole[name]), name
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(float(s["step"]) == STEPS for s in state.values())
    groups = json.loads((folder / "optimizer_groups.json").read_text())
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)

    # A damaged shard is caught by the checksums, so resuming skips that checkpoint.
    broken = runs["fsdp"].parent / "broken" / "checkpoints" / folder.name
    shutil.copytree(folder, broken)
    data = bytearray((broken / "dcp" / "__1_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "dcp" / "__1_0.distcp").write_bytes(bytes(data))
    assert "__1_0.distcp does not match" in ckpt.verify_checkpoint(broken)


def test_consolidate_writes_the_weights_of_a_shards_only_checkpoint(runs, run_scion):
    from scion.run import load_model

    folder = runs["single_to_2"] / "checkpoints" / f"step-{STEPS:08d}"
    assert (folder / "dcp" / ".metadata").is_file() and not (folder / "model.safetensors").exists()
    assert ckpt.verify_checkpoint(folder) is None
    with pytest.raises(ScionError, match="scion consolidate"):
        load_model(runs["single_to_2"])

    out = runs["single_to_2"].parent / "export.safetensors"
    consolidate(folder, plain_model(), out)
    assert not (folder / "model.safetensors").exists()  # --out leaves the checkpoint as it was
    proc = run_scion("consolidate", runs["single_to_2"])
    assert "model.safetensors" in proc.stderr
    assert ckpt.verify_checkpoint(folder) is None  # the new file is in checksums.json
    assert "model.safetensors" in json.loads((folder / "checksums.json").read_text())
    loaded = load_model(runs["single_to_2"]).model
    exported = load_file(str(out))
    for name, tensor in ckpt.model_state(loaded).items():
        assert torch.equal(tensor, exported[name]), name

    with pytest.raises(ScionError, match="not a sharded checkpoint"):
        consolidate(runs["single"] / "checkpoints" / f"step-{STEPS:08d}", plain_model())


# ---- resuming on another world size --------------------------------------------------------


@pytest.mark.parametrize("resumed, uninterrupted", [("fsdp_to_1", "fsdp"), ("single_to_2", "single")])
def test_resume_on_another_world_size_continues_the_run(runs, resumed, uninterrupted):
    # The data position: the resumed ranks together read exactly the samples of steps 5 and 6.
    reads = [json.loads(f.read_text()) for f in sorted(runs[resumed].glob("read-rank*.json"))]
    assert len(reads) == (1 if resumed == "fsdp_to_1" else 2)
    assert sorted(sum(reads, [])) == list(range(RESUME_AT * GLOBAL, STEPS * GLOBAL))
    # Schedule, optimizer moments and weights continue: the last steps match the run that
    # never stopped up to float reduction order, and so do the final weights.
    before, after = losses(runs[uninterrupted]), losses(runs[resumed])
    assert before.keys() == after.keys()
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key
    if resumed == "fsdp_to_1":
        assert_close_weights(final_weights(runs[uninterrupted]), final_weights(runs[resumed]))
    else:  # saved shards only: read them back whole
        model = plain_model()
        load_sharded(runs[resumed] / "checkpoints" / f"step-{STEPS:08d}", model)
        assert_close_weights(final_weights(runs[uninterrupted]), ckpt.model_state(model))
    trainer = json.loads((runs[resumed] / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["world_size"] == (1 if resumed == "fsdp_to_1" else 2)
    assert trainer["samples"] == STEPS * GLOBAL and trainer["tokens"] == STEPS * GLOBAL * SEQ


def test_a_signal_to_one_rank_stops_all_after_the_same_step_with_a_checkpoint(runs):
    run = runs["signalled"]
    assert (run / "stop-rank1.txt").read_text() == "SIGTERM"
    assert (run / "stop-rank0.txt").read_text() == "signal on another rank"
    assert [ref.step for ref in ckpt.list_checkpoints(run)] == [2, 3]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-00000003") is None
    reads = [json.loads((run / f"read-rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(reads[0] + reads[1]) == list(range(3 * GLOBAL))


def test_resume_on_the_same_single_process_is_bit_exact(runs):
    before, after = final_weights(runs["single"]), final_weights(runs["single_to_1"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert losses(runs["single"]) == losses(runs["single_to_1"])


# ---- the parts, in one process -------------------------------------------------------------


def test_without_tokens_per_step_a_resumed_run_keeps_its_global_batch(tmp_path):
    from scion.train.loop import Trainer
    from scion.train.world import World

    cfg = tiny_config()
    cfg.train.tokens_per_step, cfg.train.micro_batch_size = None, 4  # one micro-batch of 4 per device
    first = Trainer(cfg, tmp_path, plain_model(), NumberedSamples(128, SEQ))
    assert (first.global_batch, first.accum) == (4, 1)
    first.save()
    cfg.train.micro_batch_size = 1  # resumed on 2 ranks with smaller micro-batches
    second = Trainer(cfg, tmp_path, plain_model(), NumberedSamples(128, SEQ), world=World(0, 2, 0))
    assert second.global_batch == 2
    second.resume(ckpt.list_checkpoints(tmp_path)[-1])
    assert (second.global_batch, second.accum) == (4, 2)
    cfg.train.micro_batch_size = 3  # 4 sequences do not split into micro-batches of 3 on 2 ranks
    third = Trainer(cfg, tmp_path, plain_model(), NumberedSamples(128, SEQ), world=World(0, 2, 0))
    with pytest.raises(ScionError, match="must be a multiple of micro_batch_size x world size"):
        third.resume(ckpt.list_checkpoints(tmp_path)[-1])



# The model switches of today's families, sharded like any other weight: Qwen's q/k/v biases, Qwen3's
# per-head q/k norms, Mistral's sliding window.
FAMILY_SWITCHES = {"qkv_bias": True, "qk_norm": True, "sliding_window": 4}


def tied_or_not(parallel: str, tied: bool, switches: bool = False) -> RunConfig:
    cfg = tiny_config(parallel)
    cfg.model = dataclasses.replace(cfg.model, tie_embeddings=tied, **(FAMILY_SWITCHES if switches else {}))
    return cfg


def _sharded_init_main(rank: int, world_size: int, port: int, out: str, tied: bool, switches: bool) -> None:
    _as_rank(rank, world_size, port)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from scion.pretrain import build_model, setup
    from scion.train.parallel import parallelize, shutdown

    cfg = tied_or_not("fsdp", tied, switches)
    env = setup(cfg)
    model = build_model(cfg, env.device)
    built_on_meta = all(p.is_meta for p in model.parameters())
    parallelize(model, "fsdp", env.device, env.world, init_seed=cfg.train.seed)
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(whole, Path(out) / "whole.pt")
    seen = dict(meta=built_on_meta, local=local, tied=model.lm_head.weight is model.embed.weight)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    shutdown()


@pytest.mark.parametrize("tied, switches", [(False, False), (True, False), (True, True)],
                         ids=["untied", "tied", "tied-qwen-mistral-switches"])
def test_fsdp_builds_on_meta_and_each_rank_initialises_only_its_shards(tmp_path, tied, switches):
    """No rank holds the whole model, and the sharded weights are bit for bit those of a
    single-process run with the same seed (tied embeddings stay one parameter)."""
    from scion.pretrain import build_model

    spawn_ranks(2, _sharded_init_main, str(tmp_path), tied, switches)
    reference = build_model(tied_or_not("none", tied, switches), torch.device("cpu"))
    total = reference.num_params()
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["meta"] is True and seen["tied"] is tied
        assert seen["local"] <= total // 2 + 64  # its half (FSDP pads dim 0 to a multiple of 2)
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    expected = reference.state_dict()
    assert whole.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(whole[name], tensor), name


def test_activation_checkpointing_keeps_parameter_names_and_gradients():
    from scion.train.parallel import apply_activation_checkpointing

    data = NumberedSamples(128, SEQ)
    inputs, targets = data.batch(0, 4)
    plain, wrapped = plain_model(), plain_model()
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped)
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    loss_a, loss_b = plain(inputs, targets), wrapped(inputs, targets)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    grads_a = {n: p.grad for n, p in plain.named_parameters()}
    grads_b = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in wrapped.named_parameters()}
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    ckpt.load_into(wrapped, ckpt.model_state(plain), "test")  # checkpoints load into it unchanged


def test_many_processes_need_a_parallel_strategy(monkeypatch):
    from scion.train.parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ScionError, match="--parallel ddp or --parallel fsdp"):
        init_distributed("none", torch.device("cpu"))


# ---- the command line, as users launch it ---------------------------------------------------


@pytest.mark.slow
def test_torchrun_fsdp_then_resume_on_one_process(tmp_path, corpus, cache_dir):
    """torchrun --nproc-per-node 2 -m scion pretrain --parallel fsdp, resumed with plain
    `scion pretrain --resume` on one process, then sampled from."""
    import subprocess
    import sys

    from conftest import TINY_ARGS, scion_env

    env = scion_env(cache_dir)
    run = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(run), "--max-steps", "4", "--checkpoint-every", "2",
            "--data.val-fraction", "0.2", "--tokens-per-step", str(8 * 64), "--device", "cpu",
            "--progress", "lines", *TINY_ARGS]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "scion", "pretrain", *args, "--parallel", "fsdp", "--activation-checkpointing"]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tokens per step (1 micro-steps x 2 ranks)") == 1  # only rank 0 talks
    assert (run / "checkpoints" / "step-00000004" / "dcp" / ".metadata").is_file()

    resume = [sys.executable, "-m", "scion", "pretrain", "--resume", str(run), "--max-steps", "6",
              "--parallel", "none", "--progress", "lines"]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved on 2 ranks on 1" in proc.stderr and "(2 micro-steps per rank)" in proc.stderr
    assert (run / "checkpoints" / "step-00000006" / "optimizer.pt").is_file()

    sample = [sys.executable, "-m", "scion", "generate", str(run), "--prompt", "ROMEO.",
              "--max-new-tokens", "5"]
    proc = subprocess.run(sample, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_composes_with_compile_on_two_ranks(tmp_path, runs):
    """Per-block and output compilation under DDP's gradient hooks: the same losses as one
    uncompiled process with the same global batch."""
    run_on_ranks(2, [dict(run_dir=str(tmp_path / "ddp-compiled"), parallel="ddp", compile=True)])
    single, compiled = losses(runs["single"]), losses(tmp_path / "ddp-compiled")
    assert single.keys() == compiled.keys()
    for key, value in single.items():
        assert compiled[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_fsdp_composes_with_compile_on_one_process_group_of_one(tmp_path):
    """FSDP on a single process (the one-GPU check's path) with per-block torch.compile and
    activation checkpointing matches plain training."""
    run_on_ranks(1, [dict(run_dir=str(tmp_path / "fsdp1"), parallel="fsdp", activation_checkpointing=True,
                          compile=True)])
    train_run(str(tmp_path / "plain"), "none")
    for key, value in losses(tmp_path / "plain").items():
        assert losses(tmp_path / "fsdp1")[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
