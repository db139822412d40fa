"""Kept only for `leader_edge/serve/model.py`, which still imports `format_rows` from here: the
recommendations format lives in `leader_edge.recs` (`json_records`, `csv_lines`), and
`Bundle.recommend` is the in-memory scoring API. Remove this module once serve has moved."""

from __future__ import annotations

from collections.abc import Iterator

from leader_edge.recs import Scored, json_records


def format_rows(bundle, scored: Scored, *, fmt: str = "jsonl", threshold: float | None = None,
                top_k: int | None = None) -> Iterator[dict]:
    """`recs.json_records` with the bundle's codes, pairs and (by default) threshold."""
    if fmt != "jsonl":
        raise ValueError(f"format_rows writes jsonl only, not {fmt!r}; CSV is recs.csv_lines")
    return json_records(bundle.med_codes, scored, threshold=bundle.threshold if threshold is None else threshold,
                        top_k=top_k, ddi=bundle.ddi)
