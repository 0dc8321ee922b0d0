"""HSDP (`--parallel hsdp`): FSDP2 on a 2-D (replicate, shard) mesh, on 4 CPU processes over gloo
with the environment torchrun gives 2 nodes of 2 processes (LOCAL_WORLD_SIZE 2), so the default
mesh is 2 x 2: each node's ranks shard one replica.

One module fixture trains the tiny model of tests/test_distributed.py for 6 steps on one process,
on the 2 x 2 mesh (with activation checkpointing) and with FSDP on the same 4 ranks, then resumes
from step 4 across layouts: FSDP -> HSDP on 4 ranks; HSDP -> FSDP, DDP and HSDP 2 x 1 on 2 ranks;
HSDP -> one process. The 4-rank runs share one spawned process group, and so do the 2-rank runs.
Numbers compare as in tests/test_distributed.py (fp32, gloo): losses and gradient norms to
relative 1e-5, weights to 2e-5 absolute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_distributed import (
    GLOBAL,
    RESUME_AT,
    STEPS,
    _as_rank,
    assert_close_weights,
    final_weights,
    plain_model,
    resumable_copy,
    run_on_ranks,
    spawn_ranks,
    tiny_config,
    train_run,
)
from test_memory_plan import PARAMS, TINY

from scion.checkpoint import consolidate
from scion.checkpoint.safe_dcp import load_metadata
from scion.config import TrainConfig
from scion.errors import ScionError
from scion.train.memory import fixes, plan_memory
from scion.train.world import hsdp_shape

PER_NODE = 2  # 4 ranks as 2 nodes of 2


def metrics(run: Path) -> dict[tuple[str, int], float]:
    """Every logged loss, gradient norm and validation loss, by (name, step)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key in ("loss", "grad_norm", "val_loss"):
            if key in rec:
                out[(key, rec["step"])] = rec[key]
    return out


def _on_node(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world_size` when each node runs PER_NODE."""
    _as_rank(rank, world_size, port)
    os.environ.update(LOCAL_RANK=str(rank % PER_NODE), LOCAL_WORLD_SIZE=str(PER_NODE))


def _sharded_init(out: Path, rank: int) -> None:
    """Build the model on the meta device and shard it on the default mesh, as `scion pretrain
    --parallel hsdp` does; record the mesh, what this rank holds, and (rank 0) the gathered weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from scion.pretrain import build_model, setup
    from scion.train.parallel import parallelize

    cfg = tiny_config("hsdp")
    env = setup(cfg)
    model = build_model(cfg, env.device)
    built_on_meta = all(p.is_meta for p in model.parameters())
    parallelize(model, "hsdp", env.device, env.world, init_seed=cfg.train.seed)
    weight = model.blocks[0].attn.q_proj.weight
    mesh = weight.device_mesh
    seen = dict(meta=built_on_meta, mesh=list(mesh.shape), names=list(mesh.mesh_dim_names),
                placements=[repr(p) for p in weight.placements],
                shard_group=dist.get_process_group_ranks(mesh.get_group("shard")),
                replicate_group=dist.get_process_group_ranks(mesh.get_group("replicate")),
                local=sum(p.to_local().numel() for p in model.parameters()))
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(whole, out / "whole.pt")
    (out / f"init-rank{rank}.json").write_text(json.dumps(seen))


def _four_ranks_main(rank: int, world_size: int, port: int, root: str) -> None:
    _on_node(rank, world_size, port)
    from scion.train.parallel import shutdown

    r = Path(root)
    train_run(str(r / "fsdp4"), "fsdp")
    if rank == 0:
        resumable_copy(r / "fsdp4", r / "fsdp4_to_hsdp")
    dist.barrier()
    train_run(str(r / "fsdp4_to_hsdp"), "hsdp", resume=True)
    train_run(str(r / "hsdp"), "hsdp", activation_checkpointing=True)
    _sharded_init(r, rank)
    shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hsdp")
    names = ("single", "fsdp4", "hsdp", "fsdp4_to_hsdp", "hsdp_to_fsdp", "hsdp_to_ddp", "hsdp_to_2x1", "hsdp_to_1")
    r = {name: root / name for name in names}
    train_run(str(r["single"]), "none")
    spawn_ranks(4, _four_ranks_main, str(root))
    for name in ("hsdp_to_fsdp", "hsdp_to_ddp", "hsdp_to_2x1", "hsdp_to_1"):
        resumable_copy(r["hsdp"], r[name])
    run_on_ranks(2, [
        dict(run_dir=str(r["hsdp_to_fsdp"]), parallel="fsdp", resume=True),
        dict(run_dir=str(r["hsdp_to_ddp"]), parallel="ddp", resume=True),
        # 2 replicas of 1 rank each, 2 micro-steps per rank: gradient sync only on the last
        dict(run_dir=str(r["hsdp_to_2x1"]), parallel="hsdp", resume=True, hsdp_shard_size=1),
    ])
    train_run(str(r["hsdp_to_1"]), "none", resume=True)
    return r


def assert_same_metrics(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---- training on the 2-D mesh ---------------------------------------------------------------


def test_hsdp_on_a_2x2_mesh_matches_one_process_with_the_same_global_batch(runs):
    single, hsdp = metrics(runs["single"]), metrics(runs["hsdp"])
    assert sum(k[0] == "loss" for k in single) == STEPS and sum(k[0] == "grad_norm" for k in single) == STEPS
    # The gradient norm over DTensors sharded on one mesh dimension and replicated on the other
    # is the whole model's, as clipping needs.
    assert_same_metrics(single, hsdp)
    assert_close_weights(final_weights(runs["single"]), final_weights(runs["hsdp"]))
    # All 4 ranks are data-parallel: each read its own quarter of every global batch.
    reads = [json.loads((runs["hsdp"] / f"read-rank{r}.json").read_text()) for r in range(4)]
    assert sorted(sum(reads, [])) == list(range(STEPS * GLOBAL))
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(reads) for b in reads[i + 1:])
    trainer = json.loads((runs["hsdp"] / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["world_size"] == 4 and trainer["global_batch"] == GLOBAL


def test_hsdp_shards_within_a_node_and_builds_each_shard_on_its_rank(runs):
    """The default mesh is (nodes, ranks per node), each node's ranks share one replica's shards;
    the model is built on the meta device and each rank initialises only its shards, bit for bit
    the weights of a single process with the same seed."""
    from scion.pretrain import build_model

    total = build_model(tiny_config(), torch.device("cpu")).num_params()
    for rank in range(4):
        seen = json.loads((runs["hsdp"].parent / f"init-rank{rank}.json").read_text())
        assert seen["meta"] is True
        assert seen["mesh"] == [2, 2] and seen["names"] == ["replicate", "shard"]
        assert seen["placements"] == ["Replicate()", "Shard(dim=0)"]
        node = rank // PER_NODE
        assert seen["shard_group"] == [2 * node, 2 * node + 1]  # one node's ranks
        assert seen["replicate_group"] == [rank % PER_NODE, rank % PER_NODE + PER_NODE]
        assert seen["local"] <= total // 2 + 64  # half the model (dim 0 padded to a multiple of 2)
    whole = torch.load(runs["hsdp"].parent / "whole.pt", weights_only=True)
    expected = build_model(tiny_config(), torch.device("cpu")).state_dict()
    assert whole.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(whole[name], tensor), name


def test_hsdp_checkpoint_holds_each_shard_once_and_consolidates(runs):
    """DCP writes the replicas' identical shards once: every tensor in 2 pieces (the shard
    group's), not 4. `scion consolidate`'s function reads them back in one process, bit for bit
    the weights gathered at save time (what export and generate read)."""
    folder = runs["hsdp"] / "checkpoints" / f"step-{STEPS:08d}"
    meta = load_metadata(folder / "dcp" / ".metadata")
    weight = meta.state_dict_metadata["model.blocks.0.attn.q_proj.weight"]
    assert len(weight.chunks) == 2
    moment = meta.state_dict_metadata["optimizer.state.blocks.0.attn.q_proj.weight.exp_avg"]
    assert len(moment.chunks) == 2
    fsdp4 = load_metadata(runs["fsdp4"] / "checkpoints" / f"step-{STEPS:08d}" / "dcp" / ".metadata")
    assert len(fsdp4.state_dict_metadata["model.blocks.0.attn.q_proj.weight"].chunks) == 4
    assert (folder / "model.safetensors").is_file() and (folder / "optimizer_groups.json").is_file()
    out = consolidate(folder, plain_model(), runs["hsdp"].parent / "hsdp.safetensors")
    gathered, read_back = final_weights(runs["hsdp"]), load_file(str(out))
    assert gathered.keys() == read_back.keys()
    assert all(torch.equal(gathered[k], read_back[k]) for k in gathered)


# ---- checkpoints move between layouts --------------------------------------------------------


@pytest.mark.parametrize("resumed, uninterrupted, ranks", [
    ("fsdp4_to_hsdp", "fsdp4", 4),
    ("hsdp_to_fsdp", "hsdp", 2),
    ("hsdp_to_ddp", "hsdp", 2),
    ("hsdp_to_2x1", "hsdp", 2),
    ("hsdp_to_1", "hsdp", 1),
])
def test_a_checkpoint_resumes_across_hsdp_fsdp_and_ddp(runs, resumed, uninterrupted, ranks):
    """Saved on one layout, resumed from step 4 on another: the last steps' losses, gradient
    norms and the final weights are those of the run that never stopped, and the ranks together
    read exactly the samples of the remaining steps."""
    reads = [json.loads(f.read_text()) for f in sorted(runs[resumed].glob("read-rank*.json"))]
    assert len(reads) == ranks
    assert sorted(sum(reads, [])) == list(range(RESUME_AT * GLOBAL, STEPS * GLOBAL))
    assert_same_metrics(metrics(runs[uninterrupted]), metrics(runs[resumed]))
    assert_close_weights(final_weights(runs[uninterrupted]), final_weights(runs[resumed]))
    trainer = json.loads((runs[resumed] / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["world_size"] == ranks and trainer["samples"] == STEPS * GLOBAL


# ---- the mesh's shape ------------------------------------------------------------------------


def test_the_mesh_defaults_to_one_node_per_shard_group(monkeypatch):
    assert hsdp_shape(16, local_size=8) == (2, 8)
    assert hsdp_shape(16, 4, local_size=8) == (4, 4)  # the flag wins
    assert hsdp_shape(4, local_size=4) == (1, 4)  # one node: FSDP's layout
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hsdp_shape(32) == (4, 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert hsdp_shape(32) == (1, 32)  # no torchrun: all ranks on one node
    with pytest.raises(ScionError, match=r"^--hsdp-shard-size 3 does not divide the 8 ranks; "
                                         r"pass --hsdp-shard-size with one of 1, 2, 4, 8$"):
        hsdp_shape(8, 3)
    with pytest.raises(ScionError, match=r"^--parallel hsdp: LOCAL_WORLD_SIZE 3 .* does not divide the 8 ranks"):
        hsdp_shape(8, local_size=3)


def test_a_bad_mesh_is_refused_before_any_rank_joins(monkeypatch):
    """Under torchrun's environment, before the process group (which would wait for the others)."""
    from scion.train.parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ScionError, match="LOCAL_WORLD_SIZE 4 .* does not divide the 6 ranks"):
        init_distributed("hsdp", torch.device("cpu"))
    assert not dist.is_initialized()


def test_scion_pretrain_refuses_a_shard_size_that_does_not_divide_the_ranks(tmp_path, run_scion, corpus):
    out = tmp_path / "run"
    proc = run_scion("pretrain", "--data", corpus, "--out", out, "--device", "cpu", "--parallel", "hsdp",
                     "--hsdp-shard-size", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --hsdp-shard-size 2 does not divide the 1 rank; "
                                   "pass --hsdp-shard-size with one of 1")
    assert not out.exists()


# ---- the memory plan -------------------------------------------------------------------------


def test_the_plan_shards_over_the_shard_group_not_the_world(monkeypatch):
    """Weights, gradients and AdamW moments divide by the shard group's size under HSDP; the
    activations and gathered blocks are FSDP's."""
    hsdp = plan_memory(TINY, TrainConfig(parallel="hsdp", hsdp_shard_size=2), precision="fp32", ranks=8,
                       runtime=0.0)
    assert (hsdp.weights, hsdp.gradients, hsdp.optimizer) == (2 * PARAMS, 2 * PARAMS, 4 * PARAMS)
    assert (hsdp.shard_group, hsdp.ranks, hsdp.parallel) == (2, 8, "hsdp")
    fsdp = plan_memory(TINY, TrainConfig(parallel="fsdp"), precision="fp32", ranks=8, runtime=0.0)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (PARAMS / 2, PARAMS / 2, PARAMS)
    assert fsdp.shard_group == 8 and hsdp.activations == fsdp.activations and hsdp.logits == fsdp.logits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # the default: one node's ranks
    node = plan_memory(TINY, TrainConfig(parallel="hsdp"), precision="fp32", ranks=8, runtime=0.0)
    assert (node.weights, node.optimizer, node.shard_group) == (PARAMS, 2 * PARAMS, 4)


def test_a_plan_that_does_not_fit_suggests_a_larger_shard_group():
    train = TrainConfig(parallel="hsdp", hsdp_shard_size=1, micro_batch_size=1)
    one, two = (plan_memory(TINY, TrainConfig(parallel="hsdp", hsdp_shard_size=n, micro_batch_size=1),
                            precision="fp32", ranks=4, runtime=0.0).total for n in (1, 2))
    found = fixes(TINY, train, (one + two) / 2, precision="fp32", ranks=4, runtime=0.0, device_kind="cuda")
    assert "--hsdp-shard-size 2" in found


def test_scion_plan_shows_the_mesh(run_scion):
    proc = run_scion("plan", "--preset", "tinyllama-1.1b", "--device", "h100-80gb", "--ranks", "16",
                     "--parallel", "hsdp", "--hsdp-shard-size", "8")
    assert "16 rank(s), hsdp 2 x 8 (replicate x shard)" in proc.stdout
    proc = run_scion("plan", "--ranks", "16", "--parallel", "hsdp", "--hsdp-shard-size", "5", check=False)
    assert proc.returncode == 2 and "--hsdp-shard-size 5 does not divide the 16 ranks" in proc.stderr


# ---- slow: with torch.compile ------------------------------------------------------------------


def _compiled_main(rank: int, world_size: int, port: int, run_dir: str) -> None:
    _on_node(rank, world_size, port)
    from scion.train.parallel import shutdown

    train_run(run_dir, "hsdp", activation_checkpointing=True, compile=True)
    shutdown()


@pytest.mark.slow
def test_hsdp_composes_with_compile_and_activation_checkpointing(tmp_path):
    """Per-block compilation inside HSDP's hooks on the 2 x 2 mesh: the losses and gradient
    norms of one uncompiled process with the same global batch."""
    spawn_ranks(4, _compiled_main, str(tmp_path / "compiled"))
    train_run(str(tmp_path / "single"), "none")
    assert_same_metrics(metrics(tmp_path / "single"), metrics(tmp_path / "compiled"))
