"""Parsers for the GAMENet/SafeDrug map files: NDC -> RXCUI, RXCUI -> ATC4, CID -> ATC, TWOSIDES DDI.

    ndc2rxnorm_mapping.txt  a Python dict literal {'00338500341': u'1665046', ...} (read with
                            ast.literal_eval: a literal parser that cannot run code)
    RXCUI2atc4.csv          columns include RXCUI and ATC4; the first ATC4 of each RXCUI wins, as in
                            GAMENet's `drop_duplicates(subset=['RXCUI'])`
    drug-atc.csv            SafeDrug: `CID,ATC5,ATC5,...` per line, no header
    drug-DDI.csv            TWOSIDES: STITCH 1, STITCH 2, Polypharmacy Side Effect, Side Effect Name
    or a plain pairs file   header med_a,med_b with codes at the dataset's medication level
"""

from __future__ import annotations

import ast
import csv
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from leader_edge.errors import ConfigError, DataError
from leader_edge.data.sources.tables import column_text, encode, read_header, read_table

log = logging.getLogger(__name__)

TWOSIDES_COLUMNS = ["stitch 1", "stitch 2", "polypharmacy side effect", "side effect name"]
PAIR_COLUMNS = ["med_a", "med_b"]
# LEADER/SafeDrug keep 40 side-effect types ("TOPK = 40"). The public code sorts types by count,
# descending, and keeps `iloc[-40:]`: the 40 LEAST frequent types, not the most severe ones.
DDI_TOP_K = 40
DDI_SIDE_EFFECTS = ("least", "most", "all")


def read_ndc_rxcui(path: Path) -> dict[str, str]:
    """NDC -> RXCUI from a dict literal. NDCs mapped to '' are treated as unmapped (left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read ({e})", fix="pass the ndc2rxnorm_mapping.txt of GAMENet/SafeDrug") from None
    if not text.strip():  # literal_eval's error put it at "line 0, column 0"
        raise DataError(path, "is empty", fix="pass the ndc2rxnorm_mapping.txt of GAMENet/SafeDrug")
    try:
        data = ast.literal_eval(text)
    except (SyntaxError, ValueError) as e:
        line = getattr(e, "lineno", None)
        raise DataError(
            path, f"not a Python dict literal ({getattr(e, 'msg', e)})", line=line, column=getattr(e, "offset", None),
            fix="the file must hold one literal like {'00338500341': '1665046', ...}",
        ) from None
    if not isinstance(data, dict):
        raise DataError(path, f"holds a {type(data).__name__}, not a dict", fix="the file must hold {'NDC': 'RXCUI', ...}")
    out: dict[str, str] = {}
    for ndc, rxcui in data.items():
        if not isinstance(ndc, str) or not isinstance(rxcui, (str, int)):
            raise DataError(path, f"entry {ndc!r}: {rxcui!r} is not text -> text", fix="quote NDCs (they keep leading zeros) and RXCUIs")
        if str(rxcui).strip():
            out[ndc.strip()] = str(rxcui).strip()
    return out


def read_rxcui_atc(path: Path) -> dict[str, str]:
    """RXCUI -> ATC4 from an RXCUI2atc4.csv-style table (first ATC4 per RXCUI)."""
    table = read_table(path, ["rxcui", "atc4"], fix="pass an RXCUI2atc4.csv-style table (columns RXCUI and ATC4), as GAMENet/SafeDrug ship it")
    rxcui = column_text(table, "rxcui").to_pylist()
    atc4 = column_text(table, "atc4").to_pylist()
    out: dict[str, str] = {}
    for row, (r, a) in enumerate(zip(rxcui, atc4)):
        if r and a and r not in out:
            if len(a) < 4:
                raise DataError(path, f"ATC4 {a!r} is shorter than an ATC level-3 code (4 characters)", line=row + 2,
                                column="ATC4", fix="ATC4 codes look like C07AB")
            out[r] = a
    return out


def read_cid_atc(path: Path) -> dict[str, set[str]]:
    """PubChem CID -> ATC level-3 codes (first 4 characters of each listed ATC)."""
    out: dict[str, set[str]] = defaultdict(set)
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise DataError(path, f"CID {row[0]!r} lists no ATC code", line=line, column=2,
                                fix="each line is CID,ATC,ATC,... as SafeDrug's drug-atc.csv")
            out[row[0].strip()].update(a.strip()[:4] for a in row[1:] if len(a.strip()) >= 4)
    return dict(out)


def ddi_format(path: Path) -> str:
    """"twosides" or "pairs", from the header; anything else is an error saying both formats."""
    header = [h.strip().lower() for h in read_header(path)]
    if all(c in header for c in TWOSIDES_COLUMNS):
        return "twosides"
    if header[:2] == PAIR_COLUMNS and len(header) == 2:
        return "pairs"
    raise DataError(
        path, f"header {','.join(header)} is neither TWOSIDES nor a pairs file", line=1,
        fix="use SafeDrug's drug-DDI.csv (STITCH 1,STITCH 2,Polypharmacy Side Effect,Side Effect Name) "
            "or a two-column file with header med_a,med_b",
    )


def read_twosides(path: Path, *, side_effects: str = "least", top_k: int = DDI_TOP_K) -> tuple[list[tuple[str, str]], dict]:
    """CID pairs of a TWOSIDES file after the side-effect filter.

    Args:
        side_effects: "least" keeps the `top_k` least frequent side-effect types (what the public
            LEADER/SafeDrug code does), "most" the `top_k` most frequent, "all" every type.

    Returns:
        (distinct (cid_a, cid_b) pairs, {"rows", "rows_kept", "side_effect_types", "types_kept"}).
    """
    if side_effects not in DDI_SIDE_EFFECTS:
        raise ConfigError(f"side_effects={side_effects!r}; use one of {', '.join(DDI_SIDE_EFFECTS)}")
    table = read_table(path, TWOSIDES_COLUMNS)
    effect, effects = encode(pc.binary_join_element_wise(
        column_text(table, "polypharmacy side effect"), column_text(table, "side effect name"), "\t"))
    counts = np.bincount(effect, minlength=len(effects))
    # Count descending, ties in first-seen order (mergesort is stable), as pandas' sort then iloc.
    order = np.argsort(-counts, kind="mergesort")
    keep_types = {"least": order[-top_k:], "most": order[:top_k], "all": order}[side_effects]
    kept = np.isin(effect, keep_types)
    a_idx, a_vals = encode(column_text(table, "stitch 1"))
    b_idx, b_vals = encode(column_text(table, "stitch 2"))
    pairs_idx = np.unique(np.stack([a_idx[kept], b_idx[kept]], axis=1), axis=0)
    pairs = [(a_vals[i], b_vals[j]) for i, j in pairs_idx]
    stats = {"rows": int(len(effect)), "rows_kept": int(kept.sum()), "side_effect_types": len(effects),
             "types_kept": int(len(keep_types))}
    return pairs, stats


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(med_a, med_b) rows of a plain pairs file; a code paired with itself is an error."""
    table = read_table(path, PAIR_COLUMNS)
    out = []
    for row, (a, b) in enumerate(zip(column_text(table, "med_a").to_pylist(), column_text(table, "med_b").to_pylist())):
        if not a or not b:
            raise DataError(path, "empty medication code", line=row + 2, column="med_a" if not a else "med_b", fix="both columns need a code")
        if a == b:
            raise DataError(path, f"{a!r} paired with itself", line=row + 2, column="med_b", fix="remove the row")
        out.append((a, b))
    return out


def map_ddi(pairs: list[tuple[str, str]], vocab: set[str], translate: dict[str, set[str]] | None = None
            ) -> tuple[list[tuple[str, str]], int]:
    """Pairs mapped onto the medication vocabulary: (sorted distinct (a, b) with a < b, input pairs
    that gave no pair).

    Args:
        translate: source id -> medication codes (CID -> ATC-3); None when pairs already hold codes.
    """
    out: set[tuple[str, str]] = set()
    lost = 0
    for a, b in pairs:
        hit = False
        left = translate.get(a, ()) if translate is not None else (a,)
        right = translate.get(b, ()) if translate is not None else (b,)
        for x in left:
            if x not in vocab:
                continue
            for y in right:
                if y in vocab and x != y:
                    out.add((min(x, y), max(x, y)))
                    hit = True
        lost += not hit
    return sorted(out), lost
