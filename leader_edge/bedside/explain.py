"""Why this drug: each recommended medication's logit split over the input codes that drove it. No torch.

A bundle exported with explanations carries `explain.onnx` (manifest field `explain`): the student's
graph with the same 5 inputs as model.onnx and the logit's parts as outputs, M medications:

    deep       float32 [B, M]         the deep path's head logit, bias included
    wide       float32 [B, M]         the wide path's value: the max over the current visit's codes' rows
    wide_slot  int64   [B, M]         which code won that max: an index into the current visit's list
                                      [diagnoses | procedures | medications] as fed to the model (-1: none)
    codes      float32 [B, L, M]      each current code's share of the prior / wide-mean logit, L = Ld+Lp+Lm
    rest       float32 [B, M]         everything else (profile, history, calibration)
    deep + wide + codes.sum(1) + rest == the model's logit

and `names.json` (manifest field `names`: {kind: {code: name}}). Per recommended medication,
`Explainer.explain` returns the codes with their share of the logit (the wide winner's share is
exact: its row's value; every code's `codes` share added), the deep path's share and the rest:

    {"logit": 1.23, "probability": 0.774, "deep": 0.41, "rest": -0.12,
     "codes": [{"code": "4019", "kind": "diagnosis", "name": "Hypertension NOS", "logit": 0.71, "wide": true}, ...]}

`logit` is the sum of the parts, so `probability` = sigmoid(logit) equals the model's probability:
exactly for an fp32 bundle; in an int8 bundle the explain graph stays fp32 (the export checks its sum
against the fp32 model), so it differs from the served score by the int8 error the export's gate bounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leader_edge.bedside.encoding import KINDS, Batch
from leader_edge.errors import DataError

OUTPUTS = ("deep", "wide", "wide_slot", "codes", "rest")
# A share below this (in logit units) is noise of int8 weights and float sums, not a reason.
MIN_SHARE = 1e-4


class Explainer:
    """A bundle's explain graph and code names.

    Args:
        bundle: a loaded `runtime.Bundle` whose manifest names an `explain` file (see `available`).
        threads: onnxruntime intra-op threads.

    Raises:
        DataError: no explain graph in the bundle, or one whose outputs are not the contract's.
    """

    def __init__(self, bundle, *, threads: int = 1) -> None:
        from leader_edge.bedside.runtime import open_session

        spec = bundle.manifest.get("explain")
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            raise DataError(bundle.path / "manifest.json", "has no field 'explain': this bundle carries no explanation graph",
                            fix="export it again with a leader-edge that writes explain.onnx")
        self.session = open_session(bundle.path / spec["file"], threads)
        names = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(OUTPUTS):
            raise DataError(bundle.path / spec["file"], f"has outputs {names}; an explain graph gives {list(OUTPUTS)}",
                            fix="export the bundle again")
        self.encoder = bundle.encoder
        self.codes = [c for k in KINDS for c in bundle.encoder.codes[k]]  # shared id -> code
        self.kinds = [k for k in KINDS for _ in bundle.encoder.codes[k]]
        self.med_index = {c: j for j, c in enumerate(bundle.med_codes)}
        self.names = _names(bundle)

    @staticmethod
    def available(bundle) -> bool:
        return isinstance(bundle.manifest.get("explain"), dict)

    def parts(self, batch: Batch) -> dict[str, np.ndarray]:
        """The explain graph's outputs for an encoded batch (see the module docstring)."""
        return dict(zip((o.name for o in self.session.get_outputs()), self.session.run(None, batch.inputs())))

    def explain(self, batch: Batch, recommended: list[list[str]]) -> list[dict[str, dict]]:
        """Per row of `batch`, per medication code in `recommended[row]`, its logit's parts.

        Args:
            batch: the encoded patients (`Batch`: the current visit is slot K - 1).
            recommended: per row, the medication codes to explain (the recommended set).
        """
        parts = self.parts(batch)
        current = np.concatenate([batch.diagnoses[:, -1], batch.procedures[:, -1], batch.medications[:, -1]], axis=1)
        out = []
        for b, meds in enumerate(recommended):
            ids = current[b].tolist()  # [L] shared ids of the current visit's slots, -1 padding
            row = {}
            for med in meds:
                m = self.med_index[med]
                share = parts["codes"][b, :, m].astype(np.float64)
                slot = int(parts["wide_slot"][b, m])
                wide = float(parts["wide"][b, m])
                drivers = []
                for s in np.flatnonzero((np.abs(share) >= MIN_SHARE) | (np.arange(len(ids)) == slot)).tolist():
                    if ids[s] < 0:
                        continue
                    value = float(share[s]) + (wide if s == slot else 0.0)
                    drivers.append(self._code(ids[s]) | {"logit": round(value, 6), "wide": s == slot})
                drivers.sort(key=lambda d: -abs(d["logit"]))
                deep, rest = float(parts["deep"][b, m]), float(parts["rest"][b, m])
                # the padding slots' shares (0 in a correct graph) and a winner-less wide value go to `rest`
                listed = sum(d["logit"] for d in drivers)
                total = deep + wide + float(share.sum()) + rest
                rest_all = total - deep - listed
                row[med] = {"logit": round(total, 6), "probability": round(float(1 / (1 + np.exp(-total))), 6),
                            "deep": round(deep, 6), "rest": round(rest_all, 6), "codes": drivers}
            out.append(row)
        return out

    def explain_table(self, table, ends: np.ndarray, recommended: list[list[str]], *,
                      batch_size: int = 256) -> list[dict[str, dict]]:
        """`explain` for the visits at rows `ends` of a reader's `VisitTable` (each with its patient's
        rows before it, as `Bundle.predict` reads them), `batch_size` at a time: the `codes` output
        is [B, L, M] floats, 256 x 96 x 135 = 13 MB."""
        encoded = self.encoder.encode_table(table)
        out: list[dict[str, dict]] = []
        for a in range(0, len(ends), batch_size):
            out += self.explain(encoded.batch(ends[a:a + batch_size]), recommended[a:a + batch_size])
        return out

    def _code(self, shared_id: int) -> dict:
        code, kind = self.codes[shared_id], self.kinds[shared_id]
        return {"code": code, "kind": kind, "name": self.names.get(kind, {}).get(code)}


def _names(bundle) -> dict[str, dict[str, str]]:
    """names.json of the bundle ({kind: {code: name}}), or no names (an older bundle)."""
    spec = bundle.manifest.get("names")
    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
        return {}
    path = Path(bundle.path) / spec["file"]
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(path, f"is not a names file ({e})", fix="export the bundle again") from None
    if not isinstance(names, dict) or not all(isinstance(v, dict) for v in names.values()):
        raise DataError(path, "is not {kind: {code: name}}", fix="export the bundle again")
    return names
