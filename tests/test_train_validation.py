"""In-loop validation: sharding over processes (gloo on CPU), the live-engine path, the chat
template options, and the unchanged one-process transformers path."""

from __future__ import annotations

import contextlib
import datetime
import json
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fake_vllm import FakeEngine, FakeSamplingParams

from cppo.training.validation import (
    Shard,
    evaluate_in_memory,
    evaluate_sharded,
    shard_runs,
    vllm_engine_validation,
)
from evaluation import kv_loop
from evaluation.backends import TransformersBackend, get_backend
from evaluation.benchmarks import load_benchmark
from evaluation.prompting import build_prompts
from evaluation.runner import evaluate_benchmark, evaluate_model
from evaluation.testing import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

torch.set_num_threads(1)

K, SEED, MAX_NEW = 5, 3, 16
SAMPLING = dict(k=K, temperature=0.7, top_p=0.95, max_new_tokens=MAX_NEW, seed=SEED)
# Qwen3-style switch: the template writes an empty think block when enable_thinking is false
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}",
)


def write_bench(path: Path, n_problems: int = 7) -> Path:
    rows = [
        {"id": f"q{i}", "problem": f"What is {i} modulo 4?", "answer": str(i % 4)}
        for i in range(n_problems)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def think_tokenizer():
    tok = make_char_tokenizer()
    tok.chat_template = THINK_TEMPLATE
    return tok


def hand_reference(bench_path: Path, tok, chat_template_kwargs=None) -> dict:
    """Avg@k and truncation count straight from FakeEngine.complete, with the seed rule
    seed + problem * k + sample and the DAPO rule "Answer: <gold>" is right."""
    bench = load_benchmark(bench_path)
    prompts = build_prompts(bench.problems, tok, chat_template_kwargs=chat_template_kwargs)
    per_problem, truncated = [], 0
    for p, (row, prompt) in enumerate(zip(bench.rows, prompts, strict=True)):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        outs = [FakeEngine.complete(ids, SEED + p * K + s, MAX_NEW) for s in range(K)]
        per_problem.append(sum(o.text == f"Answer: {row['answer']}" for o in outs) / K)
        truncated += sum(o.finish_reason == "length" for o in outs)
    return {"avg_at_k": sum(per_problem) / len(per_problem), "n_truncated": truncated}


# ------------------------------------------------------------------ shards


@pytest.mark.parametrize("whole_problems", [False, True])
@pytest.mark.parametrize(
    ("n_problems", "k", "count"), [(7, 5, 4), (3, 16, 8), (2, 3, 5), (1, 1, 1)]
)
def test_shards_cover_every_pair_once_in_balanced_contiguous_blocks(
    n_problems, k, count, whole_problems
):
    blocks = []
    for index in range(count):
        pairs = [
            (p, first + j)
            for p, first, n in shard_runs(
                n_problems, k, index, count, whole_problems=whole_problems
            )
            for j in range(n)
        ]
        blocks.append(pairs)
    flat = [pair for block in blocks for pair in block]
    assert flat == [(p, s) for p in range(n_problems) for s in range(k)]
    unit = k if whole_problems else 1
    sizes = [len(b) // unit for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_shard_of_a_tensor_parallel_group():
    assert [(Shard(r, 8, 2).index, Shard(r, 8, 2).count) for r in range(4)] == [
        (0, 4),
        (0, 4),
        (1, 4),
        (1, 4),
    ]
    with pytest.raises(ValueError, match="divide"):
        Shard(0, 6, 4)


# ------------------------------------------------------------------ one process


def test_engine_validation_is_a_working_function(tmp_path):
    # before, vllm_engine_validation returned None for any live engine (the backend raised)
    bench_path = write_bench(tmp_path / "val.jsonl")
    tok = make_char_tokenizer()
    engine = FakeEngine(tok)
    fn = vllm_engine_validation(engine, sampling_params=FakeSamplingParams)
    assert callable(fn)
    got = fn(None, tok, [str(bench_path)], batch_size=64, grading_mode="dapo-strict", **SAMPLING)
    summary = got["val"]
    ref = hand_reference(bench_path, tok)
    assert summary["avg_at_k"] == pytest.approx(ref["avg_at_k"], abs=1e-12)
    assert 0 < summary["avg_at_k"] < 1  # a case that can tell right from wrong
    assert summary["n_truncated"] == ref["n_truncated"] > 0
    assert (summary["n_problems"], summary["n_samples"], summary["k"]) == (7, 7 * K, K)
    # one engine call; every (problem, sample) seed distinct
    (_, params), *more = engine.calls
    assert more == []
    seeds = [p.seed + j for p in params for j in range(p.n)]
    assert seeds == list(range(SEED, SEED + 7 * K))
    # the same as the runner's one-call path through the backend
    backend = get_backend("vllm", model=engine, sampling_params=FakeSamplingParams)
    single = evaluate_benchmark(
        backend, load_benchmark(bench_path), grading_mode="dapo-strict", **SAMPLING
    ).summary
    assert summary == single


def test_in_memory_one_shard_is_evaluate_model(tmp_path):
    bench_path = str(write_bench(tmp_path / "val.jsonl", 4))
    model, tok = make_tiny_model(seed=0)
    kw = dict(SAMPLING, max_new_tokens=6, batch_size=8, grading_mode="dapo-strict")
    ref = evaluate_model(model, tok, [bench_path], **kw)
    assert evaluate_in_memory(model, tok, [bench_path], **kw) == ref
    assert evaluate_in_memory(model, tok, [bench_path], shard=Shard(), **kw) == ref
    # the sharded machinery with one shard of whole problems reproduces the runner's summary
    backend = TransformersBackend(model, tok, batch_size=8)

    def generate_runs(prompts, runs):
        return backend.generate(
            [prompts[p] for p, _, _ in runs],
            n=K,
            temperature=0.7,
            top_p=0.95,
            max_new_tokens=6,
            seed=SEED,
        )

    got = evaluate_sharded(
        generate_runs,
        tok,
        [bench_path],
        shard=Shard(),
        whole_problems=True,
        model_name=backend.name,
        grading_mode="dapo-strict",
        **dict(SAMPLING, max_new_tokens=6),
    )
    assert got == ref
    assert ref["val"]["n_truncated"] > 0  # sample-dependent, so the equality is not vacuous


def test_chat_template_kwargs_reach_validation_prompts(tmp_path, monkeypatch):
    bench_path = str(write_bench(tmp_path / "val.jsonl", 3))
    tok = think_tokenizer()
    off = {"enable_thinking": False}
    engine = FakeEngine(tok)
    fn = vllm_engine_validation(engine, sampling_params=FakeSamplingParams)
    kw = dict(SAMPLING, grading_mode="dapo-strict")
    plain = fn(None, tok, [bench_path], **kw)
    no_think = fn(None, tok, [bench_path], chat_template_kwargs=off, **kw)
    texts = [[tok.decode(r["prompt_token_ids"]) for r in reqs] for reqs, _ in engine.calls]
    assert not any("<think>" in t for t in texts[0])
    assert all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in texts[1])
    assert plain["val"]["avg_at_k"] == pytest.approx(hand_reference(bench_path, tok)["avg_at_k"])
    assert no_think["val"]["avg_at_k"] == pytest.approx(
        hand_reference(bench_path, tok, off)["avg_at_k"]
    )

    # the in-memory path: the prompts handed to generate carry the template option
    seen = []
    original = TransformersBackend.generate

    def spy(self, prompts, **kwargs):
        seen.append(list(prompts))
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(TransformersBackend, "generate", spy)
    model, _ = make_tiny_model(seed=0)
    evaluate_in_memory(
        model, tok, [bench_path], chat_template_kwargs=off, **dict(kw, max_new_tokens=2, k=1)
    )
    assert len(seen[0]) == 3 and all(p.endswith("</think>\n\n") for p in seen[0])


# ------------------------------------------------------------------ the trainer's wiring


class _Writer:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class _FakeGeneration:
    """TRL's VLLMGeneration as the trainer's validation uses it."""

    def __init__(self, llm):
        self.llm, self.enable_sleep_mode, self.events = llm, True, []
        llm.wake_up = lambda tags: self.events.append(("wake", tuple(tags)))
        llm.sleep = lambda level: self.events.append(("sleep", level))

    def sync_weights(self):
        self.events.append(("sync",))


def trainer_stub(
    engine,
    tok,
    bench_path,
    *,
    rank=0,
    world=1,
    tp=1,
    chat_template_kwargs=None,
    model=None,
    validation_fn=evaluate_in_memory,
    sampler="generate",
):
    """An object carrying the trainer attributes InLoopValidation reads, and its `run`.

    With `model` it validates in memory (no vLLM; the caller replaces the trainer module's
    unwrap_model_for_generation), else through `engine`."""
    from cppo.training.validation_callback import InLoopValidation

    stub = types.SimpleNamespace()
    validation = dict(SAMPLING, benchmarks=[str(bench_path)], batch_size=64)
    stub.args = types.SimpleNamespace(
        validation=validation,
        vllm_mode="colocate",
        vllm_tensor_parallel_size=tp,
        ds3_gather_for_generation=True,
        sampler=sampler,
    )
    stub.chat_template_kwargs = chat_template_kwargs or {}
    stub.accelerator = types.SimpleNamespace(
        is_main_process=rank == 0,
        process_index=rank,
        num_processes=world,
        device=torch.device("cpu"),
        wait_for_everyone=lambda: None,
    )
    stub.processing_class = tok
    stub._writer = _Writer()
    stub.callback_handler = types.SimpleNamespace(on_log=lambda args, state, control, logs: control)
    stub.state = types.SimpleNamespace(global_step=4)
    stub.control = None
    stub.run_validation = InLoopValidation(stub, validation_fn).run
    stub.use_vllm = model is None
    stub.vllm_generation = _FakeGeneration(engine) if model is None else None
    stub.model_wrapped = model
    return stub


def gathered(model, accelerator, **kw):
    """unwrap_model_for_generation after a ZeRO-3 gather: the whole model on every process."""
    return contextlib.nullcontext(model)


def test_trainer_validates_through_the_synced_engine(tmp_path, monkeypatch):
    import cppo.training.validation_callback as callback_module

    # the engine function with the fake SamplingParams (vLLM is not installed here)
    monkeypatch.setattr(
        callback_module,
        "vllm_engine_validation",
        lambda llm: vllm_engine_validation(llm, sampling_params=FakeSamplingParams),
    )
    bench_path = write_bench(tmp_path / "val.jsonl")
    tok = think_tokenizer()
    engine = FakeEngine(tok)
    off = {"enable_thinking": False}
    stub = trainer_stub(engine, tok, bench_path, chat_template_kwargs=off)
    record = stub.run_validation(4)
    ref = hand_reference(bench_path, tok, off)
    assert record["val/val"] == pytest.approx(ref["avg_at_k"], abs=1e-12)
    assert stub._writer.records == [record] and record["step"] == 4
    assert stub._last_loaded_step == 4
    events = stub.vllm_generation.events
    assert events == [("sync",), ("wake", ("kv_cache",)), ("sleep", 2)]
    assert stub.vllm_generation._llm_weights_sleeping


def test_a_user_validation_fn_gets_only_the_documented_keywords(tmp_path, monkeypatch):
    # the run's chat template options go to the built-in functions only: a user function
    # written against ValidationFn (no **kw) must not get a keyword it does not take
    import cppo.training.validation_callback as callback_module

    monkeypatch.setattr(callback_module, "unwrap_model_for_generation", gathered)
    bench_path = write_bench(tmp_path / "val.jsonl")
    seen = []

    def user_fn(
        model, tokenizer, benchmarks, *, k, temperature, top_p, max_new_tokens, seed, batch_size
    ):
        seen.append(
            dict(
                k=k,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
                batch_size=batch_size,
            )
        )
        return {"val": {"avg_at_k": 0.25}}

    model, tok = make_tiny_model(seed=0)
    stub = trainer_stub(
        None,
        tok,
        bench_path,
        chat_template_kwargs={"enable_thinking": False},
        model=model,
        validation_fn=user_fn,
    )
    record = stub.run_validation(4)
    assert seen == [dict(SAMPLING, batch_size=64)]
    assert record["val/val"] == 0.25 and stub._writer.records == [record]


def test_sharded_in_memory_validation_needs_gathered_zero3_weights(tmp_path, monkeypatch):
    # without the gather each process's generate would all-gather layers with the others,
    # which cannot work while they sample different problems: refused, not a hang
    import cppo.training.validation_callback as callback_module

    monkeypatch.setattr(callback_module, "unwrap_model_for_generation", gathered)
    monkeypatch.setattr(callback_module, "is_deepspeed_zero3_enabled", lambda: True)
    model, tok = make_tiny_model(seed=0)
    stub = trainer_stub(None, tok, write_bench(tmp_path / "val.jsonl"), world=2, model=model)
    stub.args.ds3_gather_for_generation = False
    with pytest.raises(ValueError, match="ds3_gather_for_generation=True"):
        stub.run_validation(4)


@pytest.mark.parametrize("sampler", ["generate", "kv_loop"])
def test_real_trainer_in_memory_validation_is_evaluate_model(tmp_path, sampler):
    # one process, transformers: the record is evaluate_model's on the trainer's model (with
    # the KV-cache loop: evaluate_in_memory's with that sampler), and the run's
    # chat_template_kwargs reach the validation prompts
    from transformers import AutoTokenizer

    from cppo.run.config import validate_run_config
    from cppo.training.config import grpo_config_from_run
    from cppo.training.data import build_train_dataset
    from cppo.training.trainer import CPPOTrainer
    from evaluation.testing import make_tiny_model, write_train_jsonl

    model_dir = tmp_path / "model"
    make_tiny_model(model_dir, hidden_size=32, num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tok.chat_template = THINK_TEMPLATE
    tok.save_pretrained(model_dir)
    bench_path = str(write_bench(tmp_path / "val.jsonl", 3))
    batch = 8 if sampler == "generate" else 64  # the loop: all samples in one call
    validation = dict(
        SAMPLING, benchmarks=[bench_path], every=1, max_new_tokens=4, batch_size=batch
    )
    cfg = validate_run_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": str(model_dir),
            "train_data": str(write_train_jsonl(tmp_path / "train.jsonl", 8)),
            "method": {"rule": "grpo"},
            "schedule": {
                "prompts_per_iter": 2,
                "n": 2,
                "minibatch": 1,
                "updates_per_iter": 2,
                "iterations": 1,
                "max_completion_length": 4,
                "micro_batch": 2,
            },
            "validation": validation,
            "chat_template_kwargs": {"enable_thinking": False},
            "transformers": {"sampler": sampler},
        }
    )
    args, _ = grpo_config_from_run(cfg)
    ds, _ = build_train_dataset(cfg["train_data"], tok, max_prompt_length=64)
    trainer = CPPOTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        progress=False,
    )
    calls = []
    original = TransformersBackend.generate

    def spy(self, prompts, **kwargs):
        out = original(self, prompts, **kwargs)
        calls.append((list(prompts), kwargs, out))
        return out

    TransformersBackend.generate = spy
    loop_prompts = []
    original_sample = kv_loop.sample

    def loop_spy(model, prompts, **kwargs):
        loop_prompts.append([tok.decode(p) for p in prompts])
        return original_sample(model, prompts, **kwargs)

    kv_loop.sample = loop_spy
    trainer.model.train()  # as during training
    sampling = dict(k=K, temperature=0.7, top_p=0.95, max_new_tokens=4, seed=SEED, batch_size=batch)
    try:
        record = trainer.run_validation(0)
        if sampler == "generate":
            ref = evaluate_model(
                trainer.model,
                tok,
                [bench_path],
                chat_template_kwargs={"enable_thinking": False},
                **sampling,
            )
        else:
            ref = evaluate_in_memory(
                trainer.model,
                tok,
                [bench_path],
                chat_template_kwargs={"enable_thinking": False},
                sampler="kv_loop",
                **sampling,
            )
    finally:
        TransformersBackend.generate = original
        kv_loop.sample = original_sample
    (prompts, _, _), _ = calls
    if sampler == "generate":
        assert calls[0] == calls[1]  # same prompts, settings and samples as evaluate_model
        assert not loop_prompts
    else:
        # same prompts and samples (the trainer also passes synced_gpus=False, unused here)
        assert calls[0][0] == calls[1][0] and calls[0][2] == calls[1][2]
        assert len(loop_prompts) == 2 and loop_prompts[0] == loop_prompts[1]
        assert len(loop_prompts[0]) == 3 * K  # one loop call: 3 problems x K samples
    assert len(set(prompts)) == 3 and all(p.endswith("</think>\n\n") for p in prompts)
    assert record["val/val"] == ref["val"]["avg_at_k"]
    assert trainer.model.training  # train mode restored


# ------------------------------------------------------------------ several processes (gloo)


def _worker(rank: int, world: int, store: str, out: str, bench: str, tiny: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        tok = make_char_tokenizer()
        for group in (1, 2):
            engine = FakeEngine(tok)
            fn = vllm_engine_validation(engine, sampling_params=FakeSamplingParams)
            got = fn(
                None,
                tok,
                [bench],
                shard=Shard.current(group),
                grading_mode="dapo-strict",
                **SAMPLING,
            )
            requests = [
                (r["prompt_token_ids"], p.n, p.seed)
                for reqs, ps in engine.calls
                for r, p in zip(reqs, ps, strict=True)
            ]
            results[f"engine_tp{group}"] = {"summaries": got, "requests": requests}
        if world == 2:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(tiny)
            calls = []
            original = TransformersBackend.generate

            def spy(self, prompts, **kwargs):
                calls.append({"prompts": list(prompts), "n": kwargs["n"], "seed": kwargs["seed"]})
                return original(self, prompts, **kwargs)

            TransformersBackend.generate = spy
            got = evaluate_in_memory(
                model,
                tok,
                [bench],
                shard=Shard.current(),
                batch_size=8,
                grading_mode="dapo-strict",
                **dict(SAMPLING, max_new_tokens=6),
            )
            TransformersBackend.generate = original
            results["in_memory"] = {"summaries": got, "calls": calls}
            # the trainer's run_validation on every rank, with the engine
            import cppo.training.validation_callback as callback_module

            callback_module.vllm_engine_validation = lambda llm: vllm_engine_validation(
                llm, sampling_params=FakeSamplingParams
            )
            stub = trainer_stub(FakeEngine(tok), tok, bench, rank=rank, world=world)
            results["trainer"] = {"record": stub.run_validation(4), "written": stub._writer.records}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_validation_equals_one_process(tmp_path, world):
    bench = str(write_bench(tmp_path / "val.jsonl"))
    tiny = tmp_path / "tiny"
    model, tok = make_tiny_model(tiny, seed=0)
    mp.spawn(
        _worker,
        args=(world, str(tmp_path / "store"), str(tmp_path), bench, str(tiny)),
        nprocs=world,
        join=True,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    # one process over all pairs, and by hand
    single = evaluate_benchmark(
        get_backend("vllm", model=FakeEngine(tok), sampling_params=FakeSamplingParams),
        load_benchmark(bench),
        grading_mode="dapo-strict",
        **SAMPLING,
    ).summary
    ref = hand_reference(Path(bench), tok)
    for group in (1, 2):
        key = f"engine_tp{group}"
        got = ranks[0][key]["summaries"]["val"]
        assert got == json.loads(json.dumps(single))
        assert got["avg_at_k"] == pytest.approx(ref["avg_at_k"], abs=1e-12)
        assert all(r[key]["summaries"] is None for r in ranks[1:])  # only rank 0 summarises
        requests = [r[key]["requests"] for r in ranks]
        # a TP group's ranks send their shared engine identical requests; groups split the work
        leaders = requests[::group]
        for g, lead in enumerate(leaders):
            assert all(requests[g * group + m] == lead for m in range(group))
        pairs = [
            (tuple(ids), seed + j) for lead in leaders for ids, n, seed in lead for j in range(n)
        ]
        assert len(pairs) == 7 * K == len(set(pairs))
        assert all(len(lead) > 0 for lead in leaders)

    if world == 2:
        # transformers: shard i takes a block of whole problems and seed + i
        bench_obj = load_benchmark(bench)
        prompts = build_prompts(bench_obj.problems, tok)
        backend = TransformersBackend(model, tok, batch_size=8)
        truncated = 0
        for i in range(2):
            lo, hi = i * 7 // 2, (i + 1) * 7 // 2
            calls = ranks[i]["in_memory"]["calls"]
            assert calls == [{"prompts": prompts[lo:hi], "n": K, "seed": SEED + i}]
            out = backend.generate(
                prompts[lo:hi], n=K, temperature=0.7, top_p=0.95, max_new_tokens=6, seed=SEED + i
            )
            truncated += sum(s.truncated for samples in out for s in samples)
        got = ranks[0]["in_memory"]["summaries"]["val"]
        assert got["n_truncated"] == truncated and got["n_samples"] == 7 * K
        assert ranks[1]["in_memory"]["summaries"] is None
        # the trainer writes one record, on rank 0
        assert ranks[0]["trainer"]["record"]["val/val"] == pytest.approx(ref["avg_at_k"], abs=1e-12)
        assert ranks[0]["trainer"]["written"] == [ranks[0]["trainer"]["record"]]
        assert ranks[1]["trainer"] == {"record": None, "written": []}


def _empty_shard_worker(rank: int, world: int, store: str, out: str, bench: str, tiny: str):
    import torch.distributed as dist
    import transformers.generation.utils as generation_utils
    from transformers import AutoModelForCausalLM

    import cppo.training.validation_callback as callback_module

    torch.set_num_threads(1)
    # a timeout turns misaligned collectives into an error instead of a hang
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # ZeRO-3 as generate sees it: by default it would step every process's decoding
        # together (one all_reduce per token)
        generation_utils.is_deepspeed_zero3_enabled = lambda: True
        callback_module.unwrap_model_for_generation = gathered
        model = AutoModelForCausalLM.from_pretrained(tiny)
        synced = []
        original = model.generate

        def spy(*args, **kwargs):
            synced.append(kwargs.get("synced_gpus"))
            return original(*args, **kwargs)

        model.generate = spy
        tok = make_char_tokenizer()
        stub = trainer_stub(None, tok, bench, rank=rank, world=world, model=model)
        record = stub.run_validation(4)
        result = {"record": record, "written": stub._writer.records, "synced": synced}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_in_memory_validation_with_an_empty_shard_under_zero3(tmp_path):
    # one problem over two processes: rank 0's shard is empty and it never calls generate;
    # rank 1 samples all of it on the gathered weights without stepping in sync with rank 0
    bench = str(write_bench(tmp_path / "val.jsonl", 1))
    assert shard_runs(1, K, 0, 2, whole_problems=True) == []
    tiny = tmp_path / "tiny"
    model, tok = make_tiny_model(tiny, seed=0)
    mp.spawn(
        _empty_shard_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path), bench, str(tiny)),
        nprocs=2,
        join=True,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["synced"] == [] and ranks[1]["synced"] == [False]
    # the samples of one process over the whole benchmark, shard 1's seed
    ref = evaluate_in_memory(
        model,
        tok,
        [bench],
        batch_size=64,
        **dict(SAMPLING, seed=SEED + 1),
    )
    record = ranks[0]["record"]
    assert record["val/val"] == ref["val"]["avg_at_k"]
    assert ranks[0]["written"] == [record]
    assert ranks[1] == {"record": None, "written": [], "synced": [False]}


def test_a_missing_gather_is_an_error_not_a_partial_result(tmp_path):
    # a shard that thinks it has company but no process group must not summarise its part alone
    bench_path = str(write_bench(tmp_path / "val.jsonl", 2))
    tok = make_char_tokenizer()
    fn = vllm_engine_validation(FakeEngine(tok), sampling_params=FakeSamplingParams)
    with pytest.raises(RuntimeError, match="gathered 1 parts"):
        fn(None, tok, [bench_path], shard=Shard(0, 2), grading_mode="dapo-strict", **SAMPLING)
