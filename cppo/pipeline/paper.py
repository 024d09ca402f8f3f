"""The paper's reported numbers (Tables 1 and 4 of arXiv 2606.10968), checked in as CSV.

Columns: model, method, benchmark, value (percent, empty when not reported), status ("ok" or
"collapse"), note (e.g. the step of a collapse). Model and method names are the keys used in
config/paper.yaml.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).with_name("data")
TABLE1_CSV = DATA_DIR / "paper_table1.csv"
TABLE4_CSV = DATA_DIR / "paper_table4.csv"


def _read(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"note": str}, keep_default_na=True)
    df["note"] = df["note"].fillna("")
    return df


@cache
def _cached(name: str) -> pd.DataFrame:
    return _read(TABLE1_CSV if name == "table1" else TABLE4_CSV)


def paper_table(name: str) -> pd.DataFrame:
    """'table1' (benchmark 'mean') or 'table4' (aime24/25/26); a fresh copy."""
    if name not in ("table1", "table4"):
        raise ValueError(f"unknown paper table {name!r}; use 'table1' or 'table4'")
    return _cached(name).copy()


def paper_models() -> list[str]:
    return list(dict.fromkeys(paper_table("table1")["model"]))
