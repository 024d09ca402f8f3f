"""DAPO-Math-17k preparation: hub file at a pinned revision -> deduplicated JSONL for the trainer.

The hub parquet (BytedTsinghua-SIA/DAPO-Math-17k, data/dapo-math-17k.parquet) holds ~1.79M rows:
each of ~17k problems repeated many times. Rows keep the DAPO-Math-17k schema unchanged
(data_source, prompt=[{role: user, content}], ability, reward_model{ground_truth, style},
extra_info{index}); duplicates are dropped keeping the first occurrence. Dedupe keys: "prompt"
(the user message, whitespace-stripped; default), "index" (extra_info.index) or "none".
Rows whose duplicates disagree on the ground truth are counted as conflicts (first one kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DapoFormatError(ValueError):
    pass


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download(hub_id: str, revision: str, filename: str, sha256: str | None = None) -> Path:
    """The dataset file at a pinned commit, from the local HF cache or the hub."""
    from huggingface_hub import hf_hub_download

    path = Path(
        hf_hub_download(repo_id=hub_id, filename=filename, revision=revision, repo_type="dataset")
    )
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise DapoFormatError(f"{path}: sha256 {got} differs from the pinned {sha256}")
    return path


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a .parquet or .jsonl file as plain Python objects."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:
        with path.open() as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DapoFormatError(f"{path}:{i}: {err}") from None


def to_dapo_row(row: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Check one row against the DAPO-Math-17k schema; returns it with canonical types."""
    try:
        prompt = list(row["prompt"])
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise DapoFormatError(f"{where}: prompt must be one user message")
        content = prompt[0]["content"]
        if not isinstance(content, str) or not content.strip():
            raise DapoFormatError(f"{where}: empty prompt")
        truth = row["reward_model"]["ground_truth"]
        if truth is None or str(truth).strip() == "":
            raise DapoFormatError(f"{where}: empty ground_truth")
        extra = dict(row.get("extra_info") or {})
        out = {
            "data_source": str(row["data_source"]),
            "prompt": [{"role": "user", "content": content}],
            "ability": str(row["ability"]),
            "reward_model": {
                "ground_truth": str(truth),
                "style": str(row["reward_model"].get("style", "rule")),
            },
            "extra_info": {**extra, "index": str(extra.get("index", ""))},
        }
    except (KeyError, TypeError) as err:
        raise DapoFormatError(f"{where}: missing or malformed field {err}") from None
    return out


def dedupe_key(row: dict[str, Any], mode: str) -> str | None:
    if mode == "prompt":
        return row["prompt"][0]["content"].strip()
    if mode == "index":
        return row["extra_info"]["index"]
    if mode == "none":
        return None
    raise ValueError(f"unknown dedupe mode {mode!r}; use prompt, index or none")


def prepare_rows(
    rows: Iterable[dict[str, Any]], dedupe: str = "prompt", source: str = ""
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate and deduplicate; returns (rows, stats)."""
    from evaluation.dapo import PROMPT_PREFIX, PROMPT_SUFFIX

    seen: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    stats = {"rows_in": 0, "rows_out": 0, "duplicates": 0, "conflicts": 0, "off_template": 0}
    for i, raw in enumerate(rows):
        stats["rows_in"] += 1
        row = to_dapo_row(raw, where=f"{source} row {i}")
        key = dedupe_key(row, dedupe)
        truth = row["reward_model"]["ground_truth"]
        if key is not None and key in seen:
            stats["duplicates"] += 1
            if seen[key] != truth:
                stats["conflicts"] += 1
            continue
        if key is not None:
            seen[key] = truth
        content = row["prompt"][0]["content"]
        if not (content.startswith(PROMPT_PREFIX) and content.endswith(PROMPT_SUFFIX)):
            stats["off_template"] += 1
        out.append(row)
    stats["rows_out"] = len(out)
    return out, stats


def prepare(
    out: str | Path,
    *,
    source_file: str | Path | None = None,
    hub_id: str | None = None,
    revision: str | None = None,
    filename: str = "data/dapo-math-17k.parquet",
    sha256: str | None = None,
    dedupe: str = "prompt",
) -> dict[str, Any]:
    """Write the training JSONL to `out` and its stats to `<out stem>.stats.json`."""
    if source_file is None:
        if not (hub_id and revision):
            raise ValueError("give source_file, or hub_id and revision")
        path = download(hub_id, revision, filename, sha256)
    else:
        path = Path(source_file)
        if sha256 is not None and sha256_file(path) != sha256:
            raise DapoFormatError(f"{path}: sha256 differs from the pinned {sha256}")
    rows, stats = prepare_rows(read_rows(path), dedupe=dedupe, source=str(path))
    if not rows:
        raise DapoFormatError(f"{path}: no rows")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    stats.update(
        {
            "source": str(path),
            "hub_id": hub_id,
            "revision": revision,
            "dedupe": dedupe,
            "source_sha256": sha256_file(path),
        }
    )
    out.with_name(f"{out.stem}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
