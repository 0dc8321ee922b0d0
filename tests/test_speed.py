"""Speed work that must not change results: regional compilation keeps names and numbers, the
KV cache decodes exactly as full forwards do, and the one-GPU check script rehearses on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from scion.config import ModelConfig, preset
from scion.generate import generate
from scion.model import Transformer
from scion.train.compile import compile_blocks

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=32)


def tiny(seed: int = 0) -> Transformer:
    model = Transformer(CFG)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def greedy_full_forward(model: Transformer, prompt: torch.Tensor, new: int) -> torch.Tensor:
    seqs = prompt
    with torch.no_grad():
        for _ in range(new):
            seqs = torch.cat([seqs, model(seqs)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seqs


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_greedy_equals_full_forward(batch):
    model = tiny().eval()
    # Train-like weights are not needed: a larger init makes the logits far from ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    prompt = torch.randint(0, CFG.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(batch))
    assert torch.equal(generate(model, prompt, 20, temperature=0.0), greedy_full_forward(model, prompt, 20))


def test_decoding_at_an_offset_matches_the_full_sequence():
    """Rotary tables are sliced at `pos` when decoding: the same values as the full pass."""
    model = tiny().eval()
    x = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(2, 12)
        head = model(x[:, :7], pos=0)
        tail = torch.cat([model(x[:, i:i + 1], pos=i) for i in range(7, 12)], dim=1)
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-5, atol=1e-5)


def test_compile_blocks_keeps_names_and_eager_paths(monkeypatch):
    model = tiny()
    names = list(model.state_dict())
    calls = []

    def fake_compile(fn, **kw):  # what matters here is the dispatch, not inductor's code
        def compiled(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_blocks(model)
    compile_blocks(model)  # idempotent
    assert list(model.state_dict()) == names
    x = torch.randint(0, CFG.vocab_size, (2, 8))
    model(x, x).backward()
    assert calls == ["forward", "forward", "output_loss"]  # each block, then norm + head + loss
    generate(model, x[:, :3], 4, temperature=0.0)
    assert len(calls) == 3  # decoding with the cache stays eager


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's parts, on CPU with tiny models: the peers (litgpt's only where it is
    installed), scion's ladder, fp8 refused with its reason and its bf16 baseline run on the
    bundled corpus, the Trainer row, the profile and decoding."""
    env = dict(os.environ, GPU_CHECK_TIMEOUT="1500", PYTHON=sys.executable, SCION_CACHE=str(tmp_path / "cache"))
    script = ROOT / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path), "--dry-run", "--steps", "4"],
                          capture_output=True, text=True, env=env, timeout=1600)
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = results["steps"]
    assert steps["correctness"]["status"] == "ok"
    assert steps["correctness"]["kv_cache_matches_full_forward"] is True
    assert steps["fsdp_one_device"]["status"] in ("ok", "skipped")

    peers = steps["peers"]
    assert peers["status"] == "ok" and peers["flop_count"]["flops_per_token"] > 0
    ran = {name: peers[name] for name in ("scion", "litgpt", "transformers") if peers[name]["status"] == "ok"}
    assert {"scion", "transformers"} <= set(ran) and all(r["tokens_per_s"] > 0 and "mfu" in r for r in ran.values())
    assert len({r["params"] for r in ran.values()}) == 1  # one model, so one FLOP count for all
    if importlib.util.find_spec("litgpt") is None:
        assert peers["litgpt"]["status"] == "skipped" and "litgpt is not installed" in peers["litgpt"]["reason"]
    else:
        assert "litgpt" in ran

    ladder = steps["ladder"]
    assert ladder["status"] == "ok" and ladder["default"]["micro_batch"] == ran["scion"]["micro_batch"]
    assert ladder["bf16_residual"]["residual_stream"] == "bf16" and ladder["bf16_residual"]["tokens_per_s"] > 0
    assert ladder["activation_checkpointing"]["activation_checkpointing"] is True
    assert ladder.get("loss_chunks", {}).get("status") == "skipped" or ladder["loss_chunk_tokens_0"]["status"] == "ok"
    for fp8 in (steps["fp8_throughput"], steps["fp8_loss"]["fp8"]):  # no float8 GPU here
        assert fp8["status"] == "skipped" and "compute capability 8.9" in fp8["reason"], fp8
    baseline = steps["fp8_loss"]["bf16"]
    assert baseline["status"] == "ok" and baseline["val_loss"] and baseline["final_loss"] > 0

    throughput = steps["throughput"]
    assert throughput["status"] == "ok" and throughput["tokens_per_s"] > 0 and throughput["accumulation"] == 4
    assert "mfu" in throughput  # the CPU's measured peak is known
    assert steps["profile"]["status"] == "ok" and steps["profile"]["ms_by_kind"]["matrix products"] > 0
    assert steps["compiled_decoding"]["same_tokens"] is True
    assert results["ok"] is True
    plan_rows = json.loads((tmp_path / "memory_plan.json").read_text())  # after the check, in gpu_check.sh
    assert len(plan_rows) == 2 and all(r["plan"] > 0 and r["peak"] > 0 for r in plan_rows), plan_rows


def test_gpu_check_picks_the_largest_micro_batch_the_memory_line_admits():
    """The peers' search: what stays plus what each sequence adds, against 90% of the memory."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_peers import largest_fitting

    gib = 2**30
    assert largest_fitting(18 * gib, 2.9 * gib, 139 * gib) == 32  # 18 + 32 x 2.9 = 110.8 <= 125.1 < 18 + 40 x 2.9
    assert largest_fitting(18 * gib, 4 * gib, 139 * gib) == 24  # 18 + 24 x 4 = 114 <= 125.1 < 18 + 32 x 4
    assert largest_fitting(18 * gib, 200 * gib, 139 * gib) == 0


@pytest.mark.parametrize("runs_out_at, time_left, expected, tried", [
    # eager: 10 GiB + 4 a sequence -> 20 of 100 GiB; compiled, 2.5 a sequence: 32 fits too, and is faster
    (40, 1e9, 32, ["20: 20000 tokens/s", "32: 32000 tokens/s"]),
    (32, 1e9, 20, ["20: 20000 tokens/s", "32: out of memory"]),
    # out of memory at the prediction: halved (the largest candidate up to 10), then one below 20 tried
    (16, 1e9, 8, ["20: out of memory", "8: 8000 tokens/s", "16: out of memory"]),
    (40, 0.0, 20, ["20: 20000 tokens/s", "32: predicted to fit, not tried (the part's time is spent)"]),
])
def test_gpu_check_search_compiles_the_prediction_then_a_larger_one(monkeypatch, runs_out_at, time_left, expected,
                                                                     tried):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_peers

    gib = 2**30

    def measure(lib, micro, seq, vocab, device, *, compile, warmup, steps):
        if micro >= runs_out_at:
            raise torch.OutOfMemoryError("fake")
        return {"micro_batch": micro, "seq_len": seq, "tokens_per_s": 1000 * micro, "max_memory_GiB": 10 + 2.5 * micro,
                "params": 1, "run_s": 1.0}

    monkeypatch.setattr(gpu_peers, "device_memory", lambda device: 100 * gib)
    monkeypatch.setattr(gpu_peers, "probe", lambda *a: {"fixed": 10 * gib, "per_sequence": 4 * gib})
    monkeypatch.setattr(gpu_peers, "measure", measure)
    monkeypatch.setattr(gpu_peers, "peak_flops", lambda *a: None)
    lib = gpu_peers.Library("fake", None, None, None)
    result = gpu_peers.best_micro_batch(lib, CFG, 32, torch.device("cpu"), compile=True, warmup=1, steps=1,
                                        default_micro=2, time_left=lambda: time_left)
    assert result["status"] == "ok" and result["micro_batch"] == expected
    assert result["search"]["predicted"] == 20 and result["search"]["tried"] == tried


# litgpt is a benchmark-only peer (benchmarks/requirements-peers.txt): CI does not have it.
PEERS_MISSING = [name for name in ("litgpt", "lightning", "lightning_utilities", "torchmetrics")
                 if importlib.util.find_spec(name) is None]


def train_step_dry_run(tmp_path, *args, hide_litgpt: bool = False) -> tuple[dict, str]:
    """benchmarks/train_step.py on the check-tiny model, fp32 and bf16 autocast, one timed step
    each: its JSON results and its output."""
    script = ROOT / "benchmarks" / "train_step.py"
    argv = [str(script), "--dry-run", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--modes", "fp32", "bf16", "--json", str(tmp_path / "train_step.json"), *args]
    if hide_litgpt:  # the script as it runs where litgpt is not installed
        code = ("import runpy, sys; sys.modules['litgpt'] = None; "
                f"sys.path.insert(0, {str(script.parent)!r}); sys.argv = {argv!r}; "
                f"runpy.run_path({str(script)!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "train_step.json").read_text()), proc.stdout


def assert_same_step(result: dict, libs: list[str]) -> None:
    """Each library was measured in each mode and computes what scion does: parameter counts
    equal and fp32 logits within 1e-4 (the script's own guard), and the first step's loss on the
    same batch within 1e-4 in fp32 and within 2e-3 of it under bf16 autocast."""
    assert result["libs"] == libs and result["dry_run"] is True
    assert {(r["lib"], r["mode"]) for r in result["rows"]} == {(lib, m) for lib in libs for m in ("fp32", "bf16")}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert len(set(result["identity"]["params"].values())) == 1
    assert all(d <= 1e-4 for d in result["identity"]["max_abs_logit_diff"].values())
    first = {(r["lib"], r["mode"]): r["first_loss"] for r in result["rows"]}
    reference = first["scion", "fp32"]
    for lib in libs:
        assert first[lib, "fp32"] == pytest.approx(reference, abs=1e-4), first
        assert first[lib, "bf16"] == pytest.approx(reference, abs=2e-3), first
    assert set(result["ratios"]) == set(libs) - {"scion"}
    assert result["target"] == (1.3 if result["native_bf16"] else 1.1)


def test_train_step_dry_run_without_litgpt_measures_scion_and_transformers(tmp_path):
    result, out = train_step_dry_run(tmp_path, hide_litgpt=True)
    assert_same_step(result, ["scion", "transformers"])
    missing = [line for line in out.splitlines() if line.startswith("litgpt: not installed")]
    assert len(missing) == 1 and "pip install --no-deps -r benchmarks/requirements-peers.txt" in missing[0]
    assert out.startswith("machine: CPU ") and "native bf16: " in out.splitlines()[0]
    assert "MFLOP per token for every library" in out and "scion's best against transformers" in out


@pytest.mark.skipif(bool(PEERS_MISSING), reason=f"litgpt is not installed ({', '.join(PEERS_MISSING)} missing): "
                    "pip install --no-deps -r benchmarks/requirements-peers.txt")
def test_train_step_dry_run_three_way_with_litgpt(tmp_path):
    result, out = train_step_dry_run(tmp_path)
    assert_same_step(result, ["scion", "transformers", "litgpt"])
    assert "litgpt: not installed" not in out and "against the best peer" in out


@pytest.mark.parametrize("name, precision, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, (989e12, "H100 bf16 datasheet peak")),
    ("NVIDIA H100 80GB HBM3", "fp32", True, (494e12, "H100 TF32 datasheet peak")),
    ("NVIDIA H100 80GB HBM3", "fp32", False, (67e12, "H100 fp32 datasheet peak")),
    ("NVIDIA H100 PCIe", "bf16", True, (756e12, "H100 PCIe bf16 datasheet peak")),
    ("NVIDIA A100-SXM4-40GB", "fp32", False, (19.5e12, "A100 fp32 datasheet peak")),
    ("Tesla V100-SXM2-16GB", "fp32", True, (15.7e12, "V100 fp32 datasheet peak")),  # no TF32 there
    ("Tesla V100-SXM2-16GB", "bf16", True, None),
    ("NVIDIA A10G", "fp32", False, None),  # no IEEE fp32 figure in the table: no MFU, not a guess
    ("Some Future GPU", "bf16", True, None),
    ("NVIDIA L4", "bf16", True, (121e12, "L4 bf16 datasheet peak")),
    ("NVIDIA L40S", "bf16", True, (362e12, "L40S bf16 datasheet peak")),  # not the L4's
    ("NVIDIA L40", "bf16", True, None),  # not in the table, and not an L4 either
    ("NVIDIA GH200 480GB", "bf16", True, (989e12, "GH200 bf16 datasheet peak")),
    ("NVIDIA H200", "bf16", True, (989e12, "H200 bf16 datasheet peak")),
])
def test_gpu_peak_follows_the_name_precision_and_tf32(monkeypatch, name, precision, tf32, expected):
    from scion.train.device import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # TF32 is passed, not set: torch.backends.cuda.matmul's flags are no plain attributes, and
    # some pytest releases cannot undo a monkeypatch of them.
    assert peak_flops(torch.device("cuda", 0), precision, tf32=tf32) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_profile_dry_run_sorts_the_step_into_kinds(tmp_path, precision):
    """The profile script's rehearsal on CPU, in the precision asked for: every kind of work
    found, each matrix-product shape of the model timed, results written."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), str(tmp_path),
                           "--dry-run", "--no-compile", "--steps", "1", "--precision", precision],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_profile.json").read_text())
    assert result["precision"] == precision and f"sequence 64, {precision}:" in proc.stdout
    kinds = result["ms_by_kind"]
    assert {"matrix products", "attention", "optimizer and clipping", "cross-entropy"} <= set(kinds)
    assert all(ms > 0 for ms in kinds.values())
    assert 0 < result["ms_busy"] and result["tokens_per_s"] > 0
    # tiny: q/o 64x64, k/v 64x32, gate/up 64x128, down 128x64, head 64x512
    assert len(result["matmul_shapes"]) == 5
    assert result["attention"]["ms_per_layer"] > 0
    assert result["attention"]["ms_per_layer_kv_expanded"] > 0  # tiny has 4 heads over 2 KV heads
    assert "| matrix products |" in proc.stdout


def test_cpu_gemm_benchmark_covers_every_product_of_the_step():
    """benchmarks/cpu_gemm.py's list of products is the real step's: a forward and two backward
    products for each of the model's linear layers, 6 FLOPs per weight per token in all."""
    spec = importlib.util.spec_from_file_location("cpu_gemm", ROOT / "benchmarks" / "cpu_gemm.py")
    cpu_gemm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_gemm)
    cfg = preset("small")
    tokens = cfg.train.micro_batch_size * cfg.train.sequence_length(cfg.model)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    products = cpu_gemm.step_products(cfg)
    assert sum(2 * m * k * n * count for _, m, k, n, count in products) == 6 * tokens * sum(
        out * d_in for out, d_in in linears
    )
    forward = Counter()
    for name, _, k, n, count in products:
        if name.endswith("forward"):
            forward[(k, n)] += count
    assert forward == Counter((d_in, out) for out, d_in in linears)
    one = [("x forward", 8, 16, 4, 1), ("x weight grad", 4, 8, 16, 1)]
    for lib in ("torch", "numpy"):
        assert all(t > 0 for t in cpu_gemm.time_products(lib, one, threads=1, repeats=1))


@pytest.mark.slow
def test_saved_activations_benchmark_sees_the_residual_stream_dtype():
    """benchmarks/saved_activations.py: a compiled block keeps its fp32 input (and the rotary
    tables in the same dtype) for backward; a bf16 residual stream halves exactly those."""
    spec = importlib.util.spec_from_file_location("saved", ROOT / "benchmarks" / "saved_activations.py")
    saved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saved)
    seq = 24
    kept = {dtype: saved.saved_by_block(CFG, seq, dtype) for dtype in (torch.float32, torch.bfloat16)}
    inputs = {dtype: [t for t in per_token if t[0] == (1, seq, CFG.d_model)] for dtype, (per_token, _) in kept.items()}
    assert inputs[torch.float32][0][1] == torch.float32 and inputs[torch.bfloat16][0][1] == torch.bfloat16
    per_token_bytes = {dtype: sum(t[2] for t in per_token) for dtype, (per_token, _) in kept.items()}
    halved = seq * CFG.d_model + 2 * seq * CFG.dim_per_head  # the input, the cos and sin tables
    assert per_token_bytes[torch.float32] - per_token_bytes[torch.bfloat16] == halved * 2
    weight_copies = kept[torch.float32][1]
    assert weight_copies > 0 and weight_copies == kept[torch.bfloat16][1]


def test_micro_batch_hint_doubles_only_what_fits_and_keeps_the_global_batch():
    from scion.train.device import micro_batch_hint

    # tinyllama-1.1b on an H100 80GB: 36.9 GiB peak at micro-batch 8 with ~12 GiB of weights and
    # AdamW state held between steps; micro-batch 16 then measured 59.5 GiB and ran faster.
    hint = micro_batch_hint(36.9, 12.3, 79.2, micro=8, accum=128)
    assert hint and "--micro-batch-size 16" in hint and "36.9 of 79.2 GiB" in hint
    assert micro_batch_hint(59.5, 12.3, 79.2, micro=16, accum=64) is None  # twice 16 would not fit
    assert micro_batch_hint(20.0, 5.0, 79.2, micro=8, accum=1) is None  # nothing to halve
    assert micro_batch_hint(20.0, 5.0, 79.2, micro=8, accum=3) is None  # odd: the global batch would change


def test_cpu_peak_is_cached_per_cpu_model_and_only_ever_raised(tmp_path, monkeypatch):
    """The measured CPU peak belongs to one CPU model (a cache can outlive a machine), and a figure
    measured on a busy machine is replaced when measured again, never lowered."""
    from scion.train import device

    monkeypatch.setenv("SCION_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_model", lambda: "Test CPU 1")
    first = device.measured_cpu_peak("fp32")
    known = json.loads((tmp_path / "cpu_peak.json").read_text())
    (key,) = known
    assert "Test CPU 1" in key and known[key] == first > 0
    known[key] = 1.0  # as if measured while the machine was busy
    (tmp_path / "cpu_peak.json").write_text(json.dumps(known))
    assert device.measured_cpu_peak("fp32") == 1.0  # the cache is trusted ...
    again = device.measured_cpu_peak("fp32", refresh=True)  # ... until asked to measure again
    assert again > 1.0 and json.loads((tmp_path / "cpu_peak.json").read_text())[key] == again
    known = json.loads((tmp_path / "cpu_peak.json").read_text())
    known[key] = 1e18  # a figure above anything measurable stays
    (tmp_path / "cpu_peak.json").write_text(json.dumps(known))
    assert device.measured_cpu_peak("fp32", refresh=True) == 1e18
    monkeypatch.setattr(device, "cpu_model", lambda: "Test CPU 2")
    device.measured_cpu_peak("fp32")
    assert len(json.loads((tmp_path / "cpu_peak.json").read_text())) == 2


def test_a_run_faster_than_the_cached_cpu_peak_measures_it_again(tmp_path, corpus, cache_dir, monkeypatch, capfd):
    """A peak cached while the machine was busy would give an MFU far above 100%: the run measures
    the peak again, and reports MFU only where it is at most 100%."""
    from scion.pretrain import pretrain
    from scion.train import device
    from tests.test_train import tiny_config

    calls = []
    measure = device.measured_cpu_peak

    def stale_until_refreshed(precision, refresh=False):
        calls.append(refresh)
        return measure(precision, refresh=True) if refresh else 1.0  # 1 FLOP/s: the busy machine's figure

    monkeypatch.setattr(device, "measured_cpu_peak", stale_until_refreshed)
    cfg = tiny_config(corpus, max_steps=4, log_every=2, eval_every=100, checkpoint_every=100)
    run_dir, _, _ = pretrain(cfg, tmp_path / "run", resume=False, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r]
    assert len(windows) == 2 and calls == [False, True]  # measured again once, not every window
    assert all(0 < r["mfu"] <= 1 for r in windows) or all("mfu" not in r for r in windows)
    log = capfd.readouterr().err
    assert "measured again" in log or "no MFU is reported" in log
