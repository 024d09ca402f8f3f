"""Does plain GRPO learn on the toy testbed? A measurement script, not the suite's trainer.

Per iteration: P prompts from the train split, n samples each at temperature 1 (no top-k /
top-p), DAPO reward (+1 / -1), group-normalised advantages, then the rollout batch is split
into U minibatches (by prompt) with one optimizer step each on the PPO clipped surrogate
(eps_low 0.2, eps_high 0.28; ratio against the rollout policy, token-mean). Validation
Avg@k (temperature 0.7, top-p 0.95) before, every --eval-every iterations, and after.

    python benchmarks/toy_rl_check.py --model MODEL_DIR --data DATA_DIR --out result.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cppo.toy.quick_eval import sample_completions, toy_avg_at_k
from cppo.toy.task import read_jsonl
from evaluation.dapo import dapo_reward


def sequence_logps(model, prompt_ids: list[list[int]], resp_ids: list[list[int]], pad_id: int):
    """Per-token log-probs of the responses: [B, T] (left-padded prompts, right-padded responses)."""
    b = len(prompt_ids)
    lp, lr = max(map(len, prompt_ids)), max(map(len, resp_ids))
    ids = torch.full((b, lp + lr), pad_id, dtype=torch.long)
    attn = torch.zeros((b, lp + lr), dtype=torch.long)
    rmask = torch.zeros((b, lr), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, resp_ids, strict=True)):
        ids[i, lp - len(p) : lp] = torch.tensor(p)
        ids[i, lp : lp + len(r)] = torch.tensor(r)
        attn[i, lp - len(p) : lp + len(r)] = 1
        rmask[i, : len(r)] = True
    # Positions as generate() assigns them with left padding.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    logits = logits[:, lp - 1 : lp + lr - 1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, lp:].unsqueeze(-1)).squeeze(-1)
    return logp, rmask


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--updates", type=int, default=2, help="minibatch updates per iteration")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--clip-low", type=float, default=0.2)
    ap.add_argument("--clip-high", type=float, default=0.28)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=0, help="0: only before and after")
    ap.add_argument("--eval-k", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=0, help="first N val problems (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    train = read_jsonl(args.data / "train.jsonl")
    val = read_jsonl(args.data / "val.jsonl")
    val = val[: args.eval_limit] if args.eval_limit else val
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = random.Random(args.seed)
    order = list(range(len(train)))
    rng.shuffle(order)

    def evaluate(it: int) -> dict:
        t0 = time.perf_counter()
        r = toy_avg_at_k(
            model, tok, val, k=args.eval_k, max_new_tokens=args.max_new_tokens, seed=1234
        )
        r.pop("per_problem")
        r.update(iteration=it, seconds=time.perf_counter() - t0)
        print(json.dumps({"eval": r}), flush=True)
        return r

    evals = [evaluate(0)]
    log = []
    train_seconds = 0.0
    for it in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        rows = [train[order[(it - 1) * args.prompts + j]] for j in range(args.prompts)]
        prompts = [
            tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in rows
        ]
        t_gen = time.perf_counter()
        samples = sample_completions(
            model,
            tok,
            prompts,
            n=args.n,
            temperature=args.temperature,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.prompts * args.n,
            seed=args.seed * 100003 + it,
        )
        t_gen = time.perf_counter() - t_gen
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        flat_p, flat_r, adv, rewards, lengths, trunc = [], [], [], [], [], 0
        zero_std = 0
        for r, pid, group in zip(rows, p_ids, samples, strict=True):
            rew = [dapo_reward(text, r["reward_model"]["ground_truth"]) for text, _, _ in group]
            mu, sd = statistics.fmean(rew), statistics.pstdev(rew)
            zero_std += sd == 0
            for (_, ids, tr), x in zip(group, rew, strict=True):
                flat_p.append(pid)
                flat_r.append(ids if ids else [tok.eos_token_id])
                adv.append((x - mu) / (sd + 1e-6))
                rewards.append(x)
                lengths.append(len(ids))
                trunc += tr
        adv_t = torch.tensor(adv)
        with torch.no_grad():
            old_logp, _ = sequence_logps(model, flat_p, flat_r, tok.pad_token_id)
        per_mb = args.prompts // args.updates * args.n
        clip_frac, losses = [], []
        model.train()
        for u in range(args.updates):
            sl = slice(u * per_mb, (u + 1) * per_mb)
            logp, m = sequence_logps(model, flat_p[sl], flat_r[sl], tok.pad_token_id)
            old = old_logp[sl][:, : logp.shape[1]]
            ratio = torch.exp(logp - old)
            a = adv_t[sl].unsqueeze(1)
            surr = torch.minimum(ratio * a, ratio.clamp(1 - args.clip_low, 1 + args.clip_high) * a)
            loss = -(surr * m).sum() / m.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            clipped = ((ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)) & m
            clip_frac.append(clipped.sum().item() / m.sum().item())
            losses.append(loss.item())
        model.eval()
        dt = time.perf_counter() - t0
        train_seconds += dt
        rec = {
            "iteration": it,
            "accuracy": sum(x > 0 for x in rewards) / len(rewards),
            "zero_std_groups": zero_std / len(rows),
            "length_mean": statistics.fmean(lengths),
            "truncated": trunc,
            "clip_fraction": statistics.fmean(clip_frac),
            "loss": statistics.fmean(losses),
            "gen_s": round(t_gen, 2),
            "iter_s": round(dt, 2),
        }
        log.append(rec)
        print(json.dumps(rec), flush=True)
        if args.eval_every and it % args.eval_every == 0 and it != args.iterations:
            evals.append(evaluate(it))
    evals.append(evaluate(args.iterations))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "train_seconds": train_seconds,
        "seconds_per_iteration": train_seconds / args.iterations,
        "avg_at_k_before": evals[0]["avg_at_k"],
        "avg_at_k_after": evals[-1]["avg_at_k"],
        "evals": evals,
        "log": log,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "evals")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
