"""The resource check (cppo.pipeline.resources) against hand-computed bytes, and the multi-node
launch and per-process threads it goes with (cppo.pipeline.plan)."""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cppo.pipeline import resources
from cppo.pipeline.__main__ import main
from cppo.pipeline.config import ConfigError, load_config
from cppo.pipeline.plan import Plan
from cppo.pipeline.resources import GIB, Architecture, Throughput, TrainingJob, cost_model

ROOT = Path(__file__).resolve().parents[1]
# every shipped config, as it is given on the command line (toy-sweep, toy-seeds and toy-8up
# are overlays of toy)
CONFIG_FILES = {
    "toy": ["toy.yaml"],
    "toy-full": ["toy-full.yaml"],
    "toy-extended": ["toy-extended.yaml"],
    "toy-sweep": ["toy.yaml", "toy-sweep.yaml"],
    "toy-seeds": ["toy.yaml", "toy-seeds.yaml"],
    "toy-8up": ["toy.yaml", "toy-8up.yaml"],
    "toy-6seeds": ["toy.yaml", "toy-6seeds.yaml"],
    "paper": ["paper.yaml"],
    "ablations": ["ablations.yaml"],
    "conventions": ["conventions.yaml"],
    "ci": ["ci.yaml"],
}
QWEN30B = "Qwen3-30B-A3B-Base"


def paper() -> dict:
    return load_config(ROOT / "config" / "paper.yaml")


def trl_30b(cfg: dict) -> dict:
    """The 30B model on the project's TRL trainer (config/paper.yaml's comment): ZeRO-3 over 2
    nodes, vLLM at TP 4 and 0.5."""
    cfg = copy.deepcopy(cfg)
    entry = cfg["models"][QWEN30B]
    entry["env"] = "gpu"
    entry["training"] = {
        "extra": {
            "vllm": {
                "gpu_memory_utilization": 0.5,
                "tensor_parallel_size": 4,
                "max_model_length": 18432,
            }
        }
    }
    return cfg


def one_node_30b(cfg: dict) -> dict:
    """The 30B model as config/paper.yaml first launched it: TRL, one node, vLLM at TP 2, 0.35."""
    cfg = trl_30b(cfg)
    entry = cfg["models"][QWEN30B]
    entry["resources"]["train"]["nodes"] = 1
    entry["schedule"]["micro_batch"] = 2  # 64 responses per GPU on 8 GPUs: 2 divides it
    entry["training"]["extra"]["vllm"].update(gpu_memory_utilization=0.35, tensor_parallel_size=2)
    return cfg


# --- architectures --------------------------------------------------------------------------


def test_parameter_counts_by_hand():
    a = resources.ARCHITECTURES["Qwen3-1.7B"]
    # q, o: 2 x 2048 x 2048; k, v: 2 x 2048 x (8 x 128); q/k norms: 2 x 128
    attention = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 2 * 128
    assert attention == 12_583_168
    layer = attention + 3 * 2048 * 6144 + 2 * 2048  # gate/up/down + two norms
    assert a.layer_params() == layer == 50_336_000
    # 28 layers + one tied embedding (151936 x 2048) + the final norm
    assert a.params() == 28 * layer + 151936 * 2048 + 2048 == 1_720_574_976
    # the model cards: 1.7B (1.4B non-embedding), 8.2B, 30.5B total / 3.3B active
    assert a.params() - a.embedding_params == pytest.approx(1.4e9, rel=0.01)
    assert resources.ARCHITECTURES["Qwen3-8B"].params() == pytest.approx(8.19e9, rel=0.001)
    moe = resources.ARCHITECTURES["Qwen3-30B-A3B"]
    assert moe.params() == pytest.approx(30.5e9, rel=0.002)
    assert moe.params(active=True) == pytest.approx(3.3e9, rel=0.02)
    # an MoE layer: 128 experts x 3 x 2048 x 768 + router 2048 x 128 (8 experts active)
    moe_attention = 2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 128
    assert moe.layer_params() == moe_attention + 128 * 3 * 2048 * 768 + 2048 * 128 + 2 * 2048
    assert moe.layer_params(active=True) == (
        moe_attention + 8 * 3 * 2048 * 768 + 2048 * 128 + 2 * 2048
    )


def test_kv_bytes_per_token():
    # K and V x layers x KV heads on this GPU x head_dim x 2 bytes
    assert resources.ARCHITECTURES["Qwen3-1.7B"].kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2
    assert resources.ARCHITECTURES["Qwen3-8B"].kv_bytes_per_token() == 147_456
    moe = resources.ARCHITECTURES["Qwen3-30B-A3B"]
    assert moe.kv_bytes_per_token(2) == 2 * 48 * 2 * 128 * 2
    assert moe.kv_bytes_per_token(4) == 2 * 48 * 1 * 128 * 2 == 24_576
    assert moe.kv_bytes_per_token(8) == 24_576  # 4 KV heads over 8 GPUs: replicated


def test_architecture_lookup_and_tables_agree():
    assert resources.architecture_name("Qwen/Qwen3-8B-Base") == "Qwen3-8B"
    assert resources.architecture_name("Qwen/Qwen3-1.7B") == "Qwen3-1.7B"
    assert resources.architecture_name("meta-llama/Llama-3.1-8B") is None
    assert set(resources.THROUGHPUT) == set(resources.ARCHITECTURES)


def test_zero_stage_of_the_accelerate_configs():
    zero3 = "accelerate launch --config_file config/accelerate/zero3.yaml -m"
    assert resources.zero_stage(zero3, ROOT) == 3
    assert resources.zero_stage(zero3) == 3  # found in the repository from any directory
    assert resources.zero_stage("accelerate launch --config_file=config/accelerate/ddp.yaml") == 0
    assert resources.zero_stage("python -m") == 0
    with pytest.raises(ValueError, match="commands.train.launcher"):
        resources.zero_stage("accelerate launch --config_file nope.yaml -m", ROOT)


# --- memory by hand -------------------------------------------------------------------------

# 2 layers, hidden 4, 2 heads of 2 (q_dim 4), 1 KV head (kv_dim 2), MLP 8, vocab 10, tied.
TINY = Architecture(
    layers=2,
    hidden=4,
    heads=2,
    kv_heads=1,
    head_dim=2,
    vocab=10,
    intermediate=8,
    tied_embeddings=True,
)


def tiny_job(**over) -> TrainingJob:
    job = TrainingJob(
        model="tiny",
        arch_name="Qwen3-1.7B",  # its THROUGHPUT entry (patched where a test uses it)
        arch=TINY,
        nodes=1,
        gpus_per_node=4,
        gpu_mem_gib=16.0,
        zero_stage=3,
        backend="vllm",
        vllm_mode="colocate",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        sleep_mode=True,
        max_model_length=8,
        micro_batch=2,
        prompts_per_iter=4,
        n=2,
        iterations=10,
        max_prompt_length=3,
        max_completion_length=5,
        gradient_checkpointing=True,
        lm_head_fp32=True,
        val_every=5,
        val_benchmarks=2,
        val_k=4,
        val_max_new_tokens=5,
        val_batch_size=3,
        save_every=5,
        keep_checkpoints=1,
        snapshots="all",
        runtime_min=60,
        runs=2,
    )
    return dataclasses.replace(job, **over)


def test_tiny_model_memory_by_hand():
    # layer: q, o 2 x 4 x 4 = 32; k, v 2 x 4 x 2 = 16; q/k norms 2 x 2 = 4; MLP 3 x 4 x 8 = 96;
    # norms 2 x 4 = 8 -> 156. Model: 2 x 156 + embedding 10 x 4 (tied, once) + final norm 4
    assert TINY.layer_params() == 156 and TINY.params() == 356
    job = tiny_job()
    mem = resources.memory(job)
    assert mem.states == 16 * 356 / 4 == 1424  # ZeRO-3: 16 B/param over 4 GPUs
    # two gathered layers' bf16 weights + gradients, the fp32 LM head + its gradient
    assert mem.buffers == 2 * 156 * 2 * 2 + 40 * 4 * 2 == 1568
    # micro-batch 2 x (3 + 5) = 16 tokens; a checkpoint is hidden x tokens x 2 B per layer
    assert mem.checkpoints == 2 * 4 * 16 * 2 == 256
    # recomputed layer: (5 x 4 + 2 x 4 + 2 x 2 + 4 x 8) = 64 values per token, x 2 (gradients)
    assert mem.layer_work == 2 * 64 * 16 * 2 == 4096
    assert mem.logits == 2 * 5 * 10 * 4 == 400  # fp32 completion logits of the micro-batch
    # engine: 0.5 x 16 GiB; bf16 weights over TP 2; KV: K+V x 2 layers x 1 head x 2 x 2 B
    assert mem.engine_budget == 8 * GIB
    assert mem.engine_weights == 2 * 356 / 2 == 356
    assert mem.kv_budget == 8 * GIB - 356 - 2 * GIB
    assert mem.kv_per_token == 16
    assert mem.kv_sequences == (6 * GIB - 356) // (8 * 16)
    reserve, runtime = 3 * GIB, 2 * GIB
    assert mem.phases["rollout"] == 1424 + 8 * GIB + reserve
    # asleep, the engine keeps only its runtime during the update
    assert mem.phases["update"] == 1424 + 1568 + 256 + 4096 + 400 + reserve + runtime
    assert mem.peak_phase == "rollout" and resources.memory_errors(job, mem) == []
    awake = resources.memory(tiny_job(sleep_mode=False))
    assert awake.phases["update"] == 1424 + 1568 + 256 + 4096 + 400 + reserve + 8 * GIB


def test_tiny_model_other_settings_by_hand():
    # DDP (stage 0): 16 B/param on every GPU, nothing gathered; no checkpointing: every layer's
    # 64 values per token are kept; a bf16 head: 2 B logits
    mem = resources.memory(tiny_job(zero_stage=0, gradient_checkpointing=False, lm_head_fp32=False))
    assert (mem.states, mem.buffers, mem.checkpoints) == (16 * 356, 0, 0)
    assert mem.layer_work == 2 * 64 * 16 * 2
    assert mem.logits == 2 * 5 * 10 * 2
    # transformers backend: HF generate holds the KV of the per-process rollout batch
    # (4 prompts x 2 / 4 GPUs = 2 sequences of 8 tokens) and of a validation batch (3 x 8)
    mem = resources.memory(tiny_job(backend="transformers"))
    kv = 2 * 2 * 1 * 2 * 2  # no tensor parallelism: 16 B/token
    assert mem.parts["rollout"]["rollout KV"] == 2 * 8 * kv
    assert mem.parts["validation"]["validation KV"] == 3 * 8 * kv
    # under ZeRO-3 it generates on the whole model, gathered in bf16: 2 x 356 B on every GPU
    assert mem.parts["rollout"]["gathered bf16 model"] == 2 * 356
    assert mem.phases["rollout"] == 1424 + 1568 + 2 * 356 + 2 * 8 * kv + 3 * GIB
    assert mem.phases["validation"] == 1424 + 1568 + 2 * 356 + 3 * 8 * kv + 3 * GIB
    # DDP: every GPU holds its full model already, nothing is gathered
    ddp = resources.memory(tiny_job(backend="transformers", zero_stage=0))
    assert ddp.phases["validation"] == 16 * 356 + 3 * 8 * kv + 3 * GIB
    assert ddp.phases["rollout"] == 16 * 356 + 2 * 8 * kv + 3 * GIB


def test_vllm_server_mode_by_hand():
    # the engine runs on other GPUs: the training GPUs hold no engine in any phase, and
    # validation samples with HF generate on the gathered model
    job = tiny_job(vllm_mode="server")
    mem = resources.memory(job)
    kv = 16
    assert (mem.engine_budget, mem.engine_weights, mem.kv_budget) == (0, 0, 0)
    assert mem.phases["rollout"] == 1424 + 1568 + 3 * GIB
    assert mem.phases["update"] == 1424 + 1568 + 256 + 4096 + 400 + 3 * GIB
    assert mem.phases["validation"] == 1424 + 1568 + 2 * 356 + 3 * 8 * kv + 3 * GIB
    # the colocated engine's settings are not this job's to check
    job = tiny_job(vllm_mode="server", gpu_memory_utilization=0.99, max_model_length=None)
    assert resources.memory_errors(job, resources.memory(job)) == []
    # read from the config; the table says where the engine is
    cfg = paper()
    cfg["models"]["Qwen3-8B-Base"]["training"]["extra"]["vllm"]["mode"] = "server"
    report = resources.check(Plan(cfg), ROOT)
    rows = {r.job.model: r for r in report.rows}
    assert rows["Qwen3-8B-Base"].job.vllm_mode == "server"
    assert rows["Qwen3-1.7B"].job.vllm_mode == "colocate"
    line = next(x for x in resources.format_report(report).splitlines() if "Qwen3-8B-Base" in x)
    assert " server " in line


def test_refusals_name_the_model_and_the_numbers():
    job = tiny_job(gpu_mem_gib=10.0)  # rollout: 1424 B + 5 GiB engine + 3 GiB reserve fits
    assert resources.memory_errors(job, resources.memory(job)) == []
    job = tiny_job(gpu_mem_gib=10.0, gpu_memory_utilization=0.9)  # 9 + 3 GiB > 10 GiB
    (err,) = resources.memory_errors(job, resources.memory(job))
    assert err.startswith("models.tiny: needs 12.0 GiB per GPU in the rollout phase")
    assert "but a GPU has 10.0 GiB" in err and "gpu_memory_utilization" in err
    job = tiny_job(gpu_memory_utilization=0.1)  # 1.6 GiB: below the 2 GiB engine runtime
    (err,) = resources.memory_errors(job, resources.memory(job))
    assert "models.tiny: vLLM weights" in err and "= 1.6 GiB" in err
    job = tiny_job(max_model_length=None, tensor_parallel_size=3)
    errs = resources.memory_errors(job, resources.memory(job))
    assert any(e.startswith("models.tiny.training.extra.vllm.max_model_length") for e in errs)
    assert any("tensor_parallel_size: 3 does not divide the 4 GPUs" in e for e in errs)
    job = tiny_job(max_model_length=7)  # 3 + 5 tokens do not fit, nor 3 + 5 for validation
    errs = resources.memory_errors(job, resources.memory(job))
    assert [e.split(": ", 1)[1].split(" (")[0] for e in errs] == [
        "7 tokens cut rollouts short",
        "7 tokens cut validation short",
    ]


# --- time and disk by hand ------------------------------------------------------------------


def test_cost_by_hand(monkeypatch):
    monkeypatch.setitem(resources.THROUGHPUT, "Qwen3-1.7B", Throughput(100, 50, 2))
    monkeypatch.setattr(cost_model, "MEAN_RESPONSE_FRACTION", 0.4)
    monkeypatch.setattr(cost_model, "MEAN_PROMPT_TOKENS", 3)
    monkeypatch.setattr(cost_model, "VALIDATION_PROBLEMS", 30)
    c = resources.cost(tiny_job())
    # 4 prompts x 2 samples x 0.4 x 5 tokens = 16 response tokens; + 8 x 3 prompt tokens
    assert c.response_tokens == pytest.approx(16)
    assert c.rollout_s == pytest.approx(16 / (100 * 4))
    assert c.update_s == pytest.approx((16 + 24) / (50 * 4))
    # validation: 2 benchmarks x 30 problems x k 4 x 0.4 x 5 tokens, rounds at 0, 5, 10
    assert c.validation_s == pytest.approx(2 * 30 * 4 * 2 / (100 * 4))
    assert c.validations == 3
    wall_s = 10 * (0.04 + 0.2 + 2) + 3 * 1.2
    assert c.wall_h == pytest.approx(wall_s / 3600)
    # a kill would lose save_every 5 iterations of 2.24 s and one validation round of 1.2 s
    assert c.lost_s == pytest.approx(5 * 2.24 + 1.2)
    assert c.attempts == 1  # 26 s of work in a 60 min job: never killed
    assert c.gpu_h == pytest.approx(4 * (wall_s + 600) / 3600)  # + one 10 min start-up
    # one kept full checkpoint of 14 B/param + the next one being written; `snapshots: all`: a
    # 2 B/param snapshot per validated step (iterations 5 and 10 = final/)
    assert c.full_checkpoint == 14 * 356
    assert (c.full_checkpoints, c.snapshots) == (2, 2)
    assert c.disk == 2 * 14 * 356 + 2 * 2 * 356


def test_disk_by_checkpoint_policy():
    params = 356
    # 40 iterations, checkpoints and validations every 5: 8 saves, 8 validated steps
    for over, fulls, snaps in [
        ({"snapshots": "all"}, 1 + 1, 8),
        ({"snapshots": "best"}, 1 + 1, 2),  # the best so far + the newest unscored (or final/)
        ({"snapshots": "none"}, 1 + 1, 1),  # final/ only
        ({"snapshots": "best", "keep_checkpoints": 3}, 3 + 1, 2),
        ({"snapshots": "best", "keep_checkpoints": None}, 8, 2),  # keep_checkpoints: all
    ]:
        c = resources.cost(tiny_job(iterations=40, **over))
        assert (c.full_checkpoints, c.snapshots) == (fulls, snaps), over
        assert c.disk == fulls * 14 * params + snaps * 2 * params


def test_attempts_follow_the_wall_time(monkeypatch):
    monkeypatch.setitem(resources.THROUGHPUT, "Qwen3-1.7B", Throughput(1e9, 1e9, 3600))
    # 10 iterations of one hour each, a checkpoint every iteration, 4 h jobs
    c = resources.cost(tiny_job(runtime_min=240, save_every=1))
    assert c.wall_h == pytest.approx(10, abs=1e-3)
    # a killed job keeps 240 - 10 (start-up) - 60 (lost at the kill) = 170 min of progress;
    # the last job, never killed, up to 230 min: 1 + ceil((600 - 230) / 170) = 4 jobs, not
    # ceil(600 / 240) = 3
    assert c.lost_s == pytest.approx(3600, abs=1e-3)
    assert c.attempts == 4
    # GPU-hours: 10 h of work + 4 start-ups + 3 lost hours, on 4 GPUs
    assert c.gpu_h == pytest.approx(4 * (10 + 4 / 6 + 3), abs=1e-3)


def test_a_job_too_short_to_keep_any_work_is_refused(monkeypatch):
    monkeypatch.setitem(resources.THROUGHPUT, "Qwen3-1.7B", Throughput(1e9, 1e9, 3600))
    # checkpoints every 5 one-hour iterations: a 4 h job is killed before its first one
    with pytest.raises(ValueError) as info:
        resources.cost(tiny_job(runtime_min=240, save_every=5))
    msg = str(info.value)
    assert msg.startswith("models.tiny.resources.train.runtime: a 240 min job keeps no training")
    assert "save_every = 5 iterations x 3600 s" in msg and "training.save_every" in msg
    # through the check of a config: a refusal naming the model
    cfg = paper()
    cfg["models"][QWEN30B]["resources"]["train"]["runtime"] = 300  # 5 h < 5.7 h lost + 10 min
    report = resources.check(Plan(cfg), ROOT)
    assert not report.ok
    assert [e.split(":")[0] for e in report.errors] == [f"models.{QWEN30B}.resources.train.runtime"]


# --- the shipped configs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_every_shipped_config_passes(name):
    plan = Plan(load_config(*(ROOT / "config" / f for f in CONFIG_FILES[name])))
    report = resources.check(plan, ROOT)
    assert report.ok, report.errors
    assert bool(report.rows) == (name == "paper")


def test_paper_settings_and_their_estimate():
    plan = Plan(paper())
    report = resources.check(plan, ROOT)
    rows = {r.job.model: r for r in report.rows}
    assert list(rows) == plan.matrix.models
    big = rows[QWEN30B]
    assert (big.job.nodes, big.job.world_size, big.job.tensor_parallel_size) == (2, 16, 4)
    # ZeRO-3 over 16 GPUs: 16 B x 30,532,122,624 params / 16
    assert big.memory.states == 30_532_122_624
    assert big.memory.engine_weights == 2 * 30_532_122_624 / 4
    # the trainer's checkpoint defaults: one kept full checkpoint, the best snapshot
    assert (big.job.keep_checkpoints, big.job.snapshots) == (1, "best")
    assert big.cost.disk == 2 * 14 * 30_532_122_624 + 2 * 2 * 30_532_122_624
    for r in report.rows:
        assert r.memory.peak <= r.job.gpu_bytes and r.memory.kv_sequences >= 1
        assert r.job.max_model_length == r.job.seq_len
    # the longest run needs the most 48 h jobs; the train rule retries that often, plus a spare
    attempts = max(r.cost.attempts for r in report.rows)
    assert attempts == big.cost.attempts > 1
    assert report.train_retries() == attempts - 1 + cost_model.SPARE_ATTEMPTS
    text = resources.format_report(report)
    assert "Per-GPU memory of one training job" in text and "ASSUMED throughput" in text
    assert all(m in text for m in plan.matrix.models) and "REFUSED" not in text


def test_one_node_30b_is_refused_with_the_numbers():
    report = resources.check(Plan(one_node_30b(paper())), ROOT)
    assert not report.ok
    text = "\n".join(report.errors)
    # 61.1 GB of bf16 weights over TP 2 = 28.4 GiB > 0.35 x 79.6 GiB = 27.9 GiB
    assert "models.Qwen3-30B-A3B-Base: vLLM weights 28.4 GiB per GPU (tensor_parallel_size 2)" in (
        text
    )
    assert "= 27.9 GiB" in text
    # 16 B/param over 8 GPUs: 56.9 GiB of ZeRO-3 states before anything else
    assert "models.Qwen3-30B-A3B-Base: needs" in text and "training states 56.9" in text
    assert all("Qwen3-30B-A3B-Base" in e for e in report.errors)


def test_a_model_without_architecture_numbers_is_refused():
    cfg = paper()
    cfg["models"]["Qwen3-8B-Base"]["hub"]["id"] = "meta-llama/Llama-3.1-8B"
    report = resources.check(Plan(cfg), ROOT)
    assert report.errors == [
        "models.Qwen3-8B-Base.hub.id: no architecture numbers for 'meta-llama/Llama-3.1-8B'; add "
        "them from its config.json to cppo.pipeline.resources.ARCHITECTURES (and THROUGHPUT)"
    ]
    assert [r.job.model for r in report.rows] == ["Qwen3-1.7B", "Qwen3-1.7B-Base", QWEN30B]


def test_cli(tmp_path, capsys):
    assert main(["check-resources", str(ROOT / "config" / "paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Qwen3-30B-A3B-Base  verl     2x8" in out and "GPU-h" in out
    bad = tmp_path / "bad.yaml"
    import yaml

    bad.write_text(yaml.safe_dump(one_node_30b(paper())))
    assert main(["check-resources", str(bad)]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert main(["validate", str(bad)]) == 1
    assert "models.Qwen3-30B-A3B-Base" in capsys.readouterr().err
    assert main(["check-resources", str(ROOT / "config" / "toy.yaml")]) == 0
    assert "nothing to check" in capsys.readouterr().out


# --- config keys ------------------------------------------------------------------------------


def errors_of(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Plan(cfg)
    return info.value.errors


def test_micro_batch_must_divide_the_per_process_share():
    cfg = paper()
    cfg["models"]["Qwen3-8B-Base"]["schedule"]["micro_batch"] = 3
    (err,) = errors_of(cfg)
    # 32 prompts x 8 samples over 8 GPUs = 32 responses per GPU
    assert err.startswith("models.Qwen3-8B-Base.schedule.micro_batch: 3 does not divide")
    assert "32 = minibatch x n / processes (256 / 8)" in err
    cfg = paper()
    cfg["models"]["Qwen3-8B-Base"]["resources"]["train"]["gpus"] = 3
    assert any("do not split over 3 training processes" in e for e in errors_of(cfg))


def test_multi_node_and_launcher_errors():
    cfg = paper()
    cfg["commands"]["train"]["launcher"] = "python -m"
    (err,) = errors_of(cfg)
    assert err.startswith(f"models.{QWEN30B}.resources.train.nodes: training on 2 nodes needs")
    cfg = paper()
    cfg["commands"]["train"]["launcher"] += " --num_processes 8"
    assert any(
        e.startswith("commands.train.launcher: remove --num_processes") for e in errors_of(cfg)
    )
    cfg = paper()
    cfg["models"]["Qwen3-1.7B"]["resources"]["train"]["nodse"] = 2
    assert any("unknown key 'nodse' (did you mean 'nodes'?)" in e for e in errors_of(cfg))


# --- run.yaml, resources and the launch ---------------------------------------------------


def test_run_yaml_threads_and_micro_batch():
    plan = Plan(trl_30b(paper()))
    expect = {  # model: (threads per node // 8 processes, micro_batch)
        "Qwen3-1.7B": (32 // 8, 4),
        "Qwen3-1.7B-Base": (32 // 8, 4),
        "Qwen3-8B-Base": (64 // 8, 2),
        QWEN30B: (64 // 8, 1),
    }
    for model, (threads, micro) in expect.items():
        run = plan.resolver.run_config(model, "cppo", 0)
        assert (run["threads"], run["schedule"]["micro_batch"]) == (threads, micro), model
        assert run["vllm"]["max_model_length"] == 2048 + run["schedule"]["max_completion_length"]
    assert plan.resolver.run_config(QWEN30B, "cppo", 0)["vllm"]["tensor_parallel_size"] == 4
    toy = Plan(load_config(ROOT / "config" / "toy.yaml"))
    run = toy.resolver.run_config("toy-s-2up", "cppo", 0)
    assert "micro_batch" not in run["schedule"] and run["threads"] == 1


def test_snakemake_resources():
    plan = Plan(trl_30b(paper()))
    single = plan.commands.snakemake_resources("train", "Qwen3-8B-Base")
    assert single == {
        "mem_mb": 960000,
        "runtime": 2880,
        "gpu": 8,
        "nodes": None,
        "tasks_per_node": None,
        "cpus_per_task": None,
        "mpi": None,
    }
    multi = plan.commands.snakemake_resources("train", QWEN30B)
    # 2 nodes x 8 GPUs, one SLURM task per GPU with 64 // 8 cores: all 64 cores of each node
    assert {k: multi[k] for k in ("gpu", "nodes", "tasks_per_node", "cpus_per_task", "mpi")} == {
        "gpu": 16,
        "nodes": 2,
        "tasks_per_node": 8,
        "cpus_per_task": 8,
        "mpi": "srun",
    }
    assert plan.commands.snakemake_resources("evaluate", QWEN30B)["nodes"] is None


def test_train_commands():
    plan = Plan(trl_30b(paper()))
    assert plan.commands.train_command("Qwen3-8B-Base") == (
        "accelerate launch --num_processes 8 --config_file config/accelerate/zero3.yaml -m "
        "cppo.train"
    )
    cmd = plan.commands.train_command(QWEN30B)
    assert cmd.startswith(
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64 --gpus-per-node=8 "
        "--kill-on-bad-exit=1 bash -c 'exec accelerate launch --num_processes 16 "
        '--num_machines 2 --machine_rank "$SLURM_NODEID" '
    )
    assert cmd.endswith(' -m cppo.train "$@"\' cppo-train')
    toy = Plan(load_config(ROOT / "config" / "toy.yaml"))
    assert toy.commands.train_command("toy-s-2up") == "python -m cppo.train"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_multi_node_command_runs_one_launch_per_node(tmp_path):
    """The command as train-job runs it (argv + --config), with srun, scontrol and accelerate
    replaced by stubs: each node's launch gets its rank, the first host and the job's port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its options, run the command once per node with that node's SLURM_NODEID
    _stub(
        bin_dir / "srun",
        "while [[ $1 == --* ]]; do shift; done\n"
        'for i in 0 1; do SLURM_NODEID=$i "$@" || exit 1; done\n',
    )
    hostnames = ['test "$*" = "show hostnames gpu-[07-08]" || exit 2', "echo gpu-07; echo gpu-08"]
    _stub(bin_dir / "scontrol", "\n".join(hostnames) + "\n")
    _stub(bin_dir / "accelerate", f'echo "$*" >> {tmp_path}/launches\n')
    cmd = Plan(trl_30b(paper())).commands.train_command(QWEN30B)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_JOB_ID": "123456",
        "SLURM_NODEID": "9",  # the job shell's own value must not reach the launches
    }
    proc = subprocess.run(
        ["bash", "-c", f"{cmd} --config 'a b/run.yaml'"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    launches = (tmp_path / "launches").read_text().splitlines()
    common = (
        "--num_processes 16 --num_machines 2 --machine_rank {rank} --main_process_ip gpu-07 "
        "--main_process_port 32956 --config_file config/accelerate/zero3.yaml -m cppo.train "
        "--config a b/run.yaml"
    )  # port 29500 + 123456 % 10000
    assert launches == [f"launch {common.format(rank=r)}" for r in (0, 1)]


def test_runs_that_will_refuse_to_start_are_not_costed():
    # verl on Megatron refuses the Top-K methods at start: they are named, not billed
    cfg = paper()
    cfg["models"][QWEN30B]["training"]["verl"]["strategy"] = "megatron"
    plan = Plan(cfg)
    report = resources.check(plan, ROOT)
    big = next(r for r in report.rows if r.job.model == QWEN30B)
    refused = [m for m in plan.matrix.methods if plan.resolver.bound_rule(QWEN30B, m).needs_topk]
    assert refused and big.job.refused_runs == len(refused) * len(plan.matrix.seeds)
    assert big.job.topk == 0  # no Top-K gather in the runs that will train
    assert big.job.runs == (len(plan.matrix.methods) - len(refused)) * len(plan.matrix.seeds)
    text = resources.format_report(report)
    total = sum(r.cost.gpu_h * r.job.runs for r in report.rows)
    assert f"total: {total:,.0f} GPU-hours" in text
    assert f"{big.job.runs} (+{big.job.refused_runs} refused)" in text
    assert all(f"methods.{m}: verl.strategy:" in text and "left out of the runs" in text
               for m in refused)  # fmt: skip
    # the other models train every method
    assert all(r.job.refused_runs == 0 for r in report.rows if r.job.model != QWEN30B)
