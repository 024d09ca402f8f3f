"""Fake `python -m cppo.toy {data,tokenizer,model,warm-start}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(n: int, split: str) -> list[dict]:
    return [{"id": f"{split}-{i}", "problem": f"{i}+1", "answer": str(i + 1)} for i in range(n)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data")
    p.add_argument("--tokenizer")
    p.add_argument("--model")
    p.add_argument("--preset")
    p.add_argument("--flavour")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--slip-rate", type=float)
    p.add_argument("--difficulty")
    p.add_argument("--n-val", type=int, default=6)
    p.add_argument("--n-test", type=int, default=5)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.step == "data":
        with (out / "train.jsonl").open("w") as fh:
            for r in _rows(a.n_train, "train"):
                fh.write(
                    json.dumps(
                        {
                            "data_source": "toy",
                            "prompt": [{"role": "user", "content": r["problem"]}],
                            "ability": "MATH",
                            "reward_model": {"ground_truth": r["answer"], "style": "rule"},
                            "extra_info": {"index": r["id"]},
                        }
                    )
                    + "\n"
                )
        for split, n in (("val", a.n_val), ("test", a.n_test)):
            with (out / f"{split}.jsonl").open("w") as fh:
                for r in _rows(n, split):
                    fh.write(json.dumps(r) + "\n")
        (out / "meta.json").write_text(json.dumps({"seed": a.seed}))
    elif a.step == "tokenizer":
        (out / "tokenizer.json").write_text("{}")
    elif a.step in ("model", "warm-start"):
        (out / "config.json").write_text(
            json.dumps({"step": a.step, "preset": a.preset, "flavour": a.flavour, "seed": a.seed})
        )
    else:
        print(f"unknown step {a.step}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
