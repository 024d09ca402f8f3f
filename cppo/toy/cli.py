"""Command line: `python -m cppo.toy {data,tokenizer,model,warm-start,quick-eval} ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .presets import flavour_names, model_preset_names, presets


def _cmd_data(a: argparse.Namespace) -> dict:
    from .task import TaskConfig, write_data

    difficulty = a.difficulty or presets()["data"]["difficulty"]
    cfg = TaskConfig.from_difficulty(
        difficulty, min_terms=a.min_terms, max_terms=a.max_terms, max_operand=a.max_operand
    )
    return write_data(
        a.out,
        seed=a.seed,
        n_train=a.n_train,
        n_val=a.n_val,
        n_test=a.n_test,
        difficulty=difficulty,
        cfg=cfg,
    )


def _cmd_tokenizer(a: argparse.Namespace) -> dict:
    from .tokenizer import build_from_data

    tok = build_from_data(a.data)
    tok.save_pretrained(a.out)
    return {"out": str(a.out), "vocab_size": len(tok)}


def _cmd_model(a: argparse.Namespace) -> dict:
    from .models import build_model, count_parameters, save_model_dir
    from .tokenizer import load_tokenizer

    if not (Path(a.tokenizer) / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {a.tokenizer}; run `python -m cppo.toy tokenizer --data DATA --out {a.tokenizer}`"
        )
    tok = load_tokenizer(a.tokenizer)
    model = build_model(a.preset, tok, seed=a.seed)
    save_model_dir(model, tok, a.out, {"preset": a.preset, "seed": a.seed})
    return {"out": str(a.out), "preset": a.preset, "parameters": count_parameters(model)}


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _cmd_warm_start(a: argparse.Namespace) -> dict:
    from .warm_start import warm_start

    _set_threads(a.threads)
    overrides = {"steps": a.steps, "slip_rate": a.slip_rate}
    overrides = {k: v for k, v in overrides.items() if v is not None} or None
    rec = warm_start(
        a.model,
        a.data,
        a.flavour,
        a.out,
        seed=a.seed,
        overrides=overrides,
        progress=not a.no_progress,
    )
    out = {k: v for k, v in rec.items() if k != "history"}
    if a.eval_k:
        out["quick_eval"] = _quick_eval(
            a.out, Path(a.data) / "val.jsonl", a.eval_k, a.max_new_tokens, a.seed
        )
    return out


def _quick_eval(
    model_dir,
    bench: Path,
    k: int,
    max_new_tokens: int,
    seed: int,
    limit: int = 0,
    progress: bool = False,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quick_eval import toy_avg_at_k
    from .task import read_jsonl

    rows = read_jsonl(bench)
    rows = rows[:limit] if limit else rows
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    t0 = time.perf_counter()
    res = toy_avg_at_k(
        model, tok, rows, k=k, max_new_tokens=max_new_tokens, seed=seed, progress=progress
    )
    res.pop("per_problem")
    res["benchmark"] = str(bench)
    res["seconds"] = time.perf_counter() - t0
    return res


def _cmd_quick_eval(a: argparse.Namespace) -> dict:
    _set_threads(a.threads)
    if not a.benchmark.exists():
        raise FileNotFoundError(f"benchmark file {a.benchmark} not found")
    return _quick_eval(
        a.model, a.benchmark, a.k, a.max_new_tokens, a.seed, a.limit, progress=not a.no_progress
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cppo.toy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="generate train/val/test JSONL and meta.json")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-train", type=int)
    d.add_argument("--n-val", type=int)
    d.add_argument("--n-test", type=int)
    d.add_argument("--difficulty", choices=sorted(presets()["tasks"]))
    d.add_argument("--min-terms", type=int)
    d.add_argument("--max-terms", type=int)
    d.add_argument("--max-operand", type=int)
    d.set_defaults(func=_cmd_data)

    t = sub.add_parser("tokenizer", help="build the word+character tokenizer from a data dir")
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.set_defaults(func=_cmd_tokenizer)

    m = sub.add_parser("model", help="build a randomly initialised model directory")
    m.add_argument("--preset", required=True, choices=model_preset_names())
    m.add_argument("--tokenizer", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_model)

    w = sub.add_parser("warm-start", help="SFT a model directory on the train split")
    w.add_argument("--model", required=True, type=Path)
    w.add_argument("--data", required=True, type=Path)
    w.add_argument("--flavour", required=True, choices=flavour_names())
    w.add_argument("--out", required=True, type=Path)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    w.add_argument("--steps", type=int, help="override the flavour's number of steps")
    w.add_argument(
        "--slip-rate",
        type=float,
        help="override the per-step slip rate of every phase (sets the warm start's accuracy)",
    )
    w.add_argument("--eval-k", type=int, default=0, help="also report toy Avg@k on val.jsonl")
    w.add_argument("--max-new-tokens", type=int, default=160)
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=_cmd_warm_start)

    q = sub.add_parser("quick-eval", help="testbed Avg@k (temperature 0.7, top-p 0.95)")
    q.add_argument("--model", required=True, type=Path)
    q.add_argument(
        "--benchmark", required=True, type=Path, help="benchmark JSONL (e.g. DATA/val.jsonl)"
    )
    q.add_argument("--k", type=int, default=16)
    q.add_argument("--limit", type=int, default=0)
    q.add_argument("--max-new-tokens", type=int, default=160)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_quick_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = args.func(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    result = {"command": args.command, **result, "wall_seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
