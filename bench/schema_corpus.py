"""The real-world JSON Schema corpus both structured-output benchmarks read.

``shared/data/jsonschemabench-dev.jsonl`` next to the repo: one ``{"id", "subset",
"source", "schema"}`` per line, 40 schemas from each of JSONSchemaBench's 8 subsets
(Glaive function calling, GitHub easy/medium/hard, Kubernetes, Snowplow, Washington
Post, JSON Schema Store).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared/data/jsonschemabench-dev.jsonl"


def load_corpus(path: Path, per_subset: int = 0) -> list[dict[str, Any]]:
    """The corpus rows in file order; with ``per_subset`` > 0, the first that many of
    each subset."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if per_subset <= 0:
        return rows
    seen: Counter[str] = Counter()
    picked = []
    for row in rows:
        if seen[row["subset"]] < per_subset:
            seen[row["subset"]] += 1
            picked.append(row)
    return picked
