"""Formatting recommendations: a scored chunk -> CSV bytes or JSON objects (`OUTPUT_COLUMNS`).

numpy and the standard library only (the bedside runtime imports this). `csv_chunk` builds a whole
chunk's CSV in numpy and bytes passes; `format_rows` + `csv_text` are the per-row form it falls
back to when a field needs CSV quoting (and the form `--format jsonl` uses).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from leader_edge.runtime import Bundle, Scored

OUTPUT_COLUMNS = ("patient_id", "visit_id", "medications", "scores", "ddi_warnings", "unknown_codes")
_NEEDS_QUOTES = re.compile('[,"\r\n]')  # characters that make csv.writer quote a field
_PROB_TEXT = [f"{q / 10_000:.4f}" for q in range(10_001)]  # 4 decimals as in recs.py, formatted once
# The same as NUL-padded bytes ":0.1234;" (row 10_001 all NUL: "not listed"), for `_join_tokens`.
_PROB_BYTES = np.frombuffer("".join(f":{t};" for t in _PROB_TEXT).encode() + bytes(8), dtype=np.uint8).reshape(-1, 8)


def recommend(y_prob: np.ndarray, *, threshold: float, top_k: int | None = None) -> np.ndarray:
    """bool [N, M]: probability >= threshold, or (top_k) the k most probable medications."""
    if top_k is None:
        return y_prob >= threshold
    out = np.zeros(y_prob.shape, dtype=bool)
    k = min(top_k, y_prob.shape[1])
    if k > 0:
        top = np.argpartition(-y_prob, k - 1, axis=1)[:, :k]
        np.put_along_axis(out, top, True, axis=1)
    return out


def _code_bytes(codes: list[str], suffix: str) -> np.ndarray:
    """uint8 [M + 1, W]: each code's UTF-8 bytes + `suffix`, NUL-padded; the last row all NUL."""
    if any("\0" in c for c in codes):
        raise ValueError("a medication code contains a NUL character; re-export the bundle from a dataset without it")
    raw = [(c + suffix).encode() for c in codes]
    out = np.zeros((len(raw) + 1, max([1, *map(len, raw)])), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _join_tokens(tokens: np.ndarray) -> list[str]:
    """Per row, the concatenation of its tokens with the NUL padding dropped and the last byte (the
    trailing ';') cut: uint8 [N, T, W] -> N strings. One numpy pass for the whole chunk instead of a
    Python join over ~130 `code:prob` pieces per row (11.6 s of 100k patients' ~55 s before)."""
    flat = tokens.reshape(len(tokens), -1)
    nonzero = flat != 0
    buf = flat[nonzero].tobytes()  # rows back to back, in row order
    ends = np.cumsum(nonzero.sum(1)).tolist()
    starts = [0, *ends[:-1]]
    return [buf[a : b - 1].decode() if b > a else "" for a, b in zip(starts, ends)]


def _ranked(bundle: Bundle, scored: Scored, threshold: float | None,
            top_k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bool [N, M] recommended, in score order; bool [N, P] interacting pairs inside the
    recommendation; int64 [N, M] medication columns, highest probability first; int64 [N, M]
    their probabilities x 10,000 rounded, 0..10,000)."""
    prob = scored.y_prob
    rec = recommend(prob, threshold=bundle.threshold if threshold is None else threshold, top_k=top_k)
    hits = rec[:, bundle.ddi[:, 0]] & rec[:, bundle.ddi[:, 1]]
    order = np.argsort(-prob, axis=1, kind="stable")
    quant = np.rint(np.take_along_axis(prob, order, axis=1).astype(np.float64) * 10_000).astype(np.int64)
    return np.take_along_axis(rec, order, axis=1), hits, order, quant


def _list_tokens(bundle: Bundle, scored: Scored, threshold: float | None,
                 top_k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 NUL-padded tokens, each ending in ';', of the three list fields: medications
    [N, T1, W1], scores [N, T2, W2] (`code:prob;`), ddi_warnings [N, T3, W3] (`A+B;`).

    Listed entries are padded to the last listed position of any row: for `scores` (a prefix of the
    score order, rint being monotone) most of the 130 columns; for `medications` ~15."""
    m = scored.y_prob.shape[1]
    codes = bundle.med_codes
    rec, hits, order, quant = _ranked(bundle, scored, threshold, top_k)
    kept = quant > 0
    width = int(kept.sum(1).max(initial=0))
    names = _code_bytes(codes, "")
    scores = np.concatenate([names[np.where(kept[:, :width], order[:, :width], m)],  # [N, width, Wc] + [N, width, 8]
                             _PROB_BYTES[np.where(kept[:, :width], np.minimum(quant[:, :width], 10_000), -1)]], axis=2)
    last = int((rec * np.arange(1, m + 1)).max(initial=0))
    meds = _code_bytes(codes, ";")[np.where(rec[:, :last], order[:, :last], m)]
    n_pairs = len(bundle.ddi)
    last = int((hits * np.arange(1, n_pairs + 1)).max(initial=0))
    pair_names = _code_bytes([f"{codes[a]}+{codes[b]}" for a, b in bundle.ddi.tolist()], ";")
    warnings = pair_names[np.where(hits[:, :last], np.arange(last), n_pairs)]
    return meds, scores, warnings


def format_rows(bundle: Bundle, scored: Scored, *, fmt: str = "csv", threshold: float | None = None,
                top_k: int | None = None) -> Iterable[list | dict]:
    """Output records (CSV field lists or JSON objects, columns `OUTPUT_COLUMNS`) for a scored chunk.

    `medications` and `scores` list codes highest probability first; `scores` holds every code whose
    probability rounds to >= 0.0001 (as `recs.write_predictions`), `ddi_warnings` the interacting
    pairs inside the recommendation as `A+B`, `unknown_codes` the count of codes outside the vocabulary.
    """
    n = len(scored.visit_ids)
    if fmt == "jsonl":
        codes = bundle.med_codes
        rec, hits, order, quant = _ranked(bundle, scored, threshold, top_k)
        for i in range(n):
            keep = quant[i] > 0
            kept, kept_q = order[i, keep].tolist(), quant[i, keep].tolist()  # Python ints: numpy scalar indexing is ~5x slower
            yield {"patient_id": scored.patient_ids[i], "visit_id": scored.visit_ids[i],
                   "medications": [codes[j] for j in order[i, rec[i]].tolist()],
                   "scores": {codes[j]: v / 10_000 for j, v in zip(kept, kept_q)},
                   "ddi_warnings": [[codes[a], codes[b]] for a, b in bundle.ddi[hits[i]].tolist()],
                   "unknown_codes": int(scored.unknown[i])}
        return
    meds, scores, warnings = map(_join_tokens, _list_tokens(bundle, scored, threshold, top_k))
    for i in range(n):
        yield [scored.patient_ids[i], scored.visit_ids[i], meds[i], scores[i], warnings[i], int(scored.unknown[i])]


def csv_text(rows: Iterable[list], *, plain_codes: bool) -> str:
    """CSV lines for `format_rows` records, byte-identical to `csv.writer(lineterminator="\\n")`.

    csv.writer scans every character for quoting and cost ~21 us per row of ~130 scores (more than
    the formatting itself). When no field can need quotes - `plain_codes` (no medication code holds
    `,` `"` CR or LF; the score, medication and warning fields are built from codes, digits, `:;+.`)
    and no id of the chunk does either - the fields are joined directly; otherwise csv.writer runs.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    if plain_codes and not _NEEDS_QUOTES.search("".join(r[0] + r[1] for r in rows)):
        return "".join(f"{a},{b},{c},{d},{e},{f}\n" for a, b, c, d, e, f in rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def plain_codes(codes: list[str]) -> bool:
    """True when no code needs CSV quoting (see `csv_text`)."""
    return not any(_NEEDS_QUOTES.search(c) for c in codes)


def _packed(table: np.ndarray, index: np.ndarray, listed: np.ndarray) -> tuple[memoryview, list[int], list[int]]:
    """The listed tokens of each row back to back: `table` uint8 [K, W] NUL-padded tokens ending in
    ';', `index` int64 [L] their rows for the `listed` (bool [N, T]) entries in row-major order.

    Returns:
        (the bytes, N start offsets, N end offsets without the row's last ';').
    """
    width = (table != 0).sum(1)[index]  # [L] bytes of each token without its padding
    buf = table[index].tobytes()  # [L, W], rows in order
    if (width != table.shape[1]).any():
        buf = buf.replace(b"\0", b"")  # codes hold no NUL (`_code_bytes`), so only the padding goes
    count = listed.sum(1)  # [N]
    total = np.concatenate([[0], np.cumsum(width)])  # byte offset of each token
    last = np.cumsum(count)  # [N] tokens up to the end of each row
    ends = total[last]
    return memoryview(buf), total[last - count].tolist(), np.where(count > 0, ends - 1, ends).tolist()


def csv_chunk(bundle: Bundle, scored: Scored, *, plain_codes: bool, threshold: float | None = None,
              top_k: int | None = None) -> bytes:
    """The CSV lines of a scored chunk as UTF-8 bytes, identical to `csv_text(format_rows(...))`.

    When nothing needs quoting (see `csv_text`), each list field's listed tokens are gathered for
    the whole chunk into one bytes buffer (`_packed`) and each row is one `%`-format of ids, buffer
    slices (memoryviews, no copy) and the unknown count. On the random-weight students' ~5 KB rows
    this is 4-6x faster than decoding and joining three strings per row (`format_rows`).
    """
    ids = "".join(scored.patient_ids) + "".join(scored.visit_ids)
    if not plain_codes or _NEEDS_QUOTES.search(ids):
        return csv_text(list(format_rows(bundle, scored, threshold=threshold, top_k=top_k)), plain_codes=plain_codes).encode()
    codes = bundle.med_codes
    rec, hits, order, quant = _ranked(bundle, scored, threshold, top_k)
    kept = quant > 0  # listed in `scores`: a prefix of the score order
    names = _code_bytes(codes, "")
    named = names[order[kept]]  # [L, Wc]
    scores = np.concatenate([named, _PROB_BYTES[np.minimum(quant[kept], 10_000)]], axis=1)  # [L, Wc + 8]
    fields = [
        _packed(_code_bytes(codes, ";"), order[rec], rec),
        _packed(scores, np.arange(len(scores)), kept),
        _packed(_code_bytes([f"{codes[a]}+{codes[b]}" for a, b in bundle.ddi.tolist()], ";"), np.nonzero(hits)[1], hits),
    ]
    (m, m0, m1), (s, s0, s1), (w, w0, w1) = fields
    pids = "\n".join(scored.patient_ids).encode().split(b"\n")  # ids hold no newline here
    vids = "\n".join(scored.visit_ids).encode().split(b"\n")
    return b"".join(b"%b,%b,%b,%b,%b,%d\n" % (p, v, m[ma:mb], s[sa:sb], w[wa:wb], u)
                    for p, v, ma, mb, sa, sb, wa, wb, u in zip(pids, vids, m0, m1, s0, s1, w0, w1, scored.unknown.tolist()))
