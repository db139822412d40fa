"""Student -> ONNX (fp32) -> int8: path in, path out.

    export_onnx(model, path, inputs)               # torch.onnx dynamo exporter: the student as written
    export_onnx(model, path, inputs, graph="explain")   # Student.logit_parts: the explanation graph
    quantize_weights_int8(src, dst)                # int8 weights, fp32 arithmetic (batch-invariant)
    quantize_dynamic_int8(src, dst)                # int8 weights, activations quantized at run time
    quantize_static_int8(src, dst, calibration)    # QDQ, activation ranges calibrated on samples
    quantize_embeddings(path)                      # gathered tables as int8 + a scale per row, in place

Every input axis but the profile width is dynamic: batch B, visit slots K and the code widths
Ld/Lp/Lm (the encoder pads to the longest row of a batch, so widths differ from batch to batch).
The model graph is `Student.predict_proba` (probabilities: the runtime thresholds them as they
come); the explain graph is `Student.logit_parts` (outputs `EXPLAIN_OUTPUTS`). The student is
traced as it is - no patched kernels, no swapped methods: on CPU its bags are the padded gathers
and its visit block asks for the current slot only (train/student.py). Each export is run by
onnxruntime on a batch of other shapes than the traced one and held to torch within `ATOL`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np

from leader_edge.bedside.encoding import INPUT_NAMES
from leader_edge.errors import ConfigError
from leader_edge.bedside.runtime import METADATA_PREFIX

log = logging.getLogger(__name__)

OPSET = 18  # onnxruntime 1.32 runs it everywhere; the dynamo exporter's default
GRAPHS = {"proba": ("predict_proba", ("probabilities",)),
          "explain": ("logit_parts", ("deep", "wide", "wide_slot", "codes", "rest"))}
EXPLAIN_OUTPUTS = GRAPHS["explain"][1]
# max |ORT - torch| on the check batch (fp32 sums in another order). Probabilities: 6e-8 measured
# (stack prior, transformer sets); the bundle gate's own bound is 1e-5. Logit parts are logits, up
# to ~20, and `rest` is a difference of such sums: 1.4e-6 measured (1.9e-6 on 1,024 demo visits,
# once the prior shares avoid ONNX's Log(1 + x), see train/student.py `log1p`), 1e-4 allowed.
ATOL = {"proba": 1e-5, "explain": 1e-4}
# max |sigmoid(deep + wide + sum(codes) + rest) - p| against the fp32 model on validation: the
# parts must add up to the logit the fp32 graph squashes (measured <= 3e-7, float32 sums).
ATOL_EXPLAIN_SUM = 1e-5


def example_inputs(n_codes: int, n_profile_ids: int, n_fields: int, *, batch: int = 3, visits: int = 2,
                   widths: tuple[int, int, int] = (5, 3, 4), seed: int = 0) -> dict[str, np.ndarray]:
    """A small valid input batch (distinct sizes on every dynamic axis so none gets specialised)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, width in zip(INPUT_NAMES[:3], widths):
        a = rng.integers(0, n_codes, size=(batch, visits, width), dtype=np.int64)
        a[..., -1] = -1  # some padding
        out[name] = a
    out["profile"] = rng.integers(0, max(n_profile_ids, 1), size=(batch, max(n_fields, 1)), dtype=np.int64)
    mask = np.ones((batch, visits), dtype=np.int64)
    mask[0, 0] = 0  # a patient with a shorter history
    out["visit_mask"] = mask
    return out


def export_onnx(model, path: str | Path, inputs: dict[str, np.ndarray], *, graph: str = "proba") -> Path:
    """Export the student's `predict_proba` ("proba") or `logit_parts` ("explain") to ONNX with
    dynamic batch, visit and code axes, then check onnxruntime against torch. What is traced is
    `Student.for_export()` (group rows folded into the code rows); the check runs the student as given.

    Args:
        model: a `leader_edge.train.student.Student` (any device; exported on CPU in eval mode, so a
            backend="triton" student is refused: load it with backend="auto" or "torch").
        path: the .onnx file to write (its weights inline, one file).
        inputs: example inputs by name (`example_inputs` or an encoded batch), int64.
        graph: "proba" or "explain".

    Returns:
        `path`.

    Raises:
        ValueError: an unknown `graph`, or a backend="triton" student.
        RuntimeError: onnxruntime differs from torch by more than `ATOL[graph]`.
    """
    import torch

    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r}; use one of {', '.join(GRAPHS)}")
    if model.config.backend == "triton":
        raise ValueError("a backend='triton' student runs its Triton kernels even on CPU and cannot be traced; "
                         "load it with backend='auto' or 'torch' (load_student(..., backend='torch'))")
    method, outputs = GRAPHS[graph]

    class _Graph(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, diagnoses, procedures, medications, profile, visit_mask):
            out = getattr(self.inner, method)(diagnoses, procedures, medications, profile, visit_mask)
            return tuple(out[n] for n in outputs) if isinstance(out, dict) else out

    original = _Graph(model.cpu().eval())
    wrapper = _Graph(model.for_export())  # traced: the same function in fewer ops; checked against `original`
    args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in INPUT_NAMES)
    dim = torch.export.Dim
    batch, visits = dim("batch", min=1), dim("visits", min=1, max=model.config.max_visits)
    dynamic = {
        "diagnoses": {0: batch, 1: visits, 2: dim("diag_codes", min=1)},
        "procedures": {0: batch, 1: visits, 2: dim("proc_codes", min=1)},
        "medications": {0: batch, 1: visits, 2: dim("med_codes", min=1)},
        "profile": {0: batch},
        "visit_mask": {0: batch, 1: visits},
    }
    path = Path(path)
    with warnings.catch_warnings(), _quiet_third_party(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter; failures still raise
        program = torch.onnx.export(
            wrapper, args, input_names=list(INPUT_NAMES), output_names=list(outputs),
            dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)
    fold_constant_concats(path)
    _check_against_torch(original, path, inputs, outputs, ATOL[graph])
    log.info("exported %s (%.1f KiB)", path, path.stat().st_size / 1024)
    return path


def _check_against_torch(wrapper, path: Path, traced: dict[str, np.ndarray], outputs, atol: float) -> None:
    """Run `path` in onnxruntime on a batch of other shapes than `traced` (one more row and visit
    slot, other code widths, an empty current visit) and hold every output to torch within `atol`."""
    import torch

    c = wrapper.inner.config
    b, k = traced["visit_mask"].shape
    widths = tuple(traced[n].shape[2] + 1 + i for i, n in enumerate(INPUT_NAMES[:3]))
    check = example_inputs(c.n_codes, c.n_profile_ids, traced["profile"].shape[1], batch=b + 1,
                           visits=min(k + 1, c.max_visits), widths=widths, seed=1)
    for name in INPUT_NAMES[:3]:
        check[name][-1, -1] = -1  # a current visit with no code at all
    got = ort_session(path).run(list(outputs), check)
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(check[n]) for n in INPUT_NAMES))
    want = want if isinstance(want, tuple) else (want,)
    diffs = {n: float(np.abs(g.astype(np.float64) - w.numpy()).max()) for n, g, w in zip(outputs, got, want)}
    worst = max(diffs, key=diffs.get)
    log.info("%s: onnxruntime vs torch max diff %.2e (%s; tolerance %.0e)", path.name, diffs[worst], worst, atol)
    if diffs[worst] > atol:
        raise RuntimeError(f"{path}: onnxruntime output '{worst}' differs from the torch student by {diffs[worst]:.2e} "
                           f"(> {atol:.0e}) on a batch of shapes {dict((n, check[n].shape) for n in INPUT_NAMES)}; "
                           "an operator exports wrongly - report it with the student's config")


@contextlib.contextmanager
def _quiet_third_party():
    """Silence, at their source, messages that say nothing to a user of an export: onnxruntime's
    "Please consider pre-processing before quantization" (root logger; the model is already
    shape-inferred and constant-folded) and torch.onnx's "torchvision is not installed" (we export
    no torchvision ops). Real warnings and errors of other loggers pass."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return not ("pre-processing before quantization" in text or "torchvision is not installed" in text)

    drop, loggers = _Drop(), [logging.getLogger(), logging.getLogger("torch.onnx._internal.exporter._registration")]
    for lg in loggers:
        lg.addFilter(drop)
        for handler in lg.handlers:
            handler.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
            for handler in lg.handlers:
                handler.removeFilter(drop)


def ort_session(path: Path):
    """An onnxruntime CPU session of an ONNX file."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_proba(model, encoded: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Probabilities over pre-encoded batches (concatenated rows); `model` is an ONNX file's path or
    an `ort_session` of it (load once, score several sets)."""
    session = ort_session(model) if isinstance(model, (str, Path)) else model
    return np.concatenate([session.run(None, b)[0] for b in encoded])


def stamp_sizes(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    """Copy an ONNX file with the model's table sizes in its metadata (what the runtime checks the
    manifest's vocabulary against)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    helper.set_model_props(model, {METADATA_PREFIX + k: str(v) for k, v in sizes.items()})
    onnx.save(model, str(dst))
    return dst


def check_explain(path: Path, encoded: list[dict[str, np.ndarray]], y_prob: np.ndarray) -> float:
    """The explain graph's parts, summed, against the fp32 model's probabilities `y_prob` over the
    same `encoded` batches; returns the max |difference|.

    Raises:
        RuntimeError: over `ATOL_EXPLAIN_SUM`.
    """
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    logits = []
    for batch in encoded:
        part = dict(zip(names, session.run(None, batch)))
        logits.append(part["deep"] + part["wide"] + part["codes"].sum(axis=1) + part["rest"])
    diff = float(np.abs(1 / (1 + np.exp(-np.concatenate(logits).astype(np.float64))) - y_prob).max())
    log.info("explain: sigmoid(deep + wide + codes + rest) vs the fp32 model max diff %.2e (tolerance %.0e)",
             diff, ATOL_EXPLAIN_SUM)
    if diff > ATOL_EXPLAIN_SUM:
        raise RuntimeError(f"{path.name}: its parts add up to probabilities {diff:.2e} away from the model's "
                           f"(> {ATOL_EXPLAIN_SUM:.0e}); Student.logits and Student.logit_parts disagree - report it")
    return diff


ELEMENTWISE_OPS = frozenset({"Abs", "Add", "Clip", "Div", "Exp", "Log", "Mul", "Neg", "Sub"})
ELEMENTWISE = "elementwise"  # a reader of a weight that needs no scale axis (`quantize_weights_int8`)


def quantize_weights_int8(src: str | Path, dst: str | Path, min_size: int = 4096) -> Path:
    """Weight-only int8: every large 2-D weight stored as int8 + one scale per output channel.

    Gather tables get a scale per row, MatMul/Gemm weights one per output column. The weight is
    rebuilt as Cast(int8) * scale, which onnxruntime folds into an fp32 initializer at session start
    (a DequantizeLinear would be fused into int8 kernels that quantize activations, and those made
    a patient's probabilities depend on the batch by 1e-3), so the arithmetic, the speed and the
    batch invariance are fp32's while the file is ~32% of it. Symmetric scales keep each weight
    within half a step of its channel's range (max |dp| 8.8e-3 vs fp32 on a trained synth student).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _refuse_same(src, dst)
    model = onnx.load(str(src))
    graph = model.graph
    uses: dict[str, set] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = {("Gather", 0): 0, ("GatherND", 0): 0, ("MatMul", 1): 1, ("Gemm", 1): 0 if trans_b else 1}
            axis = ELEMENTWISE if node.op_type in ELEMENTWISE_OPS else axis.get((node.op_type, i))
            uses.setdefault(name, set()).add(axis)  # the axis of one scale per channel
    nodes = []
    for init in list(graph.initializer):
        # Elementwise readers (the prior's log table, computed from its rows) take the rebuilt weight
        # as it is; the scale's axis comes from the Gathers and matmuls, which must agree on one.
        axes = uses.get(init.name, {None}) - {ELEMENTWISE}
        table = numpy_helper.to_array(init)
        if len(axes) != 1 or None in axes or table.dtype != np.float32 or table.ndim != 2 or table.size < min_size:
            continue
        (axis,) = axes
        scale = (np.abs(table).max(axis=1 - axis, keepdims=True) / 127).astype(np.float32)  # [N, 1] or [1, N]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend([numpy_helper.from_array(q, init.name + "_int8"),
                                  numpy_helper.from_array(scale, init.name + "_scale")])
        nodes += [helper.make_node("Cast", [init.name + "_int8"], [init.name + "_wide"], to=TensorProto.FLOAT,
                                   name=init.name + "_cast"),
                  helper.make_node("Mul", [init.name + "_wide", init.name + "_scale"], [init.name], name=init.name + "_scale")]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.save(model, str(dst))
    return Path(dst)


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8: weights of MatMul/Gemm quantized per channel, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _refuse_same(src, dst)
    with _quiet_third_party():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    return Path(dst)


class _Calibration:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._iter = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:  # pragma: no cover - called by some calibrators only
        pass


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """Static int8 in QDQ format, activation ranges from `calibration` (encoded training batches).

    Only MatMul/Gemm/Gather are quantized: LayerNorm, Softmax and the masked means stay fp32, where
    int8 costs accuracy and saves little time at this model size (~0.5M parameters)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _refuse_same(src, dst)
    if not calibration:
        raise ConfigError("static quantization needs at least one calibration batch; raise --calibration-samples")
    with _quiet_third_party():
        quantize_static(
            str(src), str(dst), _Calibration(calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"], calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True},
        )
    return Path(dst)


def _refuse_same(src: str | Path, dst: str | Path) -> None:
    if Path(src).resolve() == Path(dst).resolve():
        raise ConfigError(f"quantization source and destination are both {src}; write to a new path")


def quantize_embeddings(path: str | Path, min_size: int = 4096) -> int:
    """Store gathered float tables (the code embedding) as int8 + one scale per row, in place.

    onnxruntime's quantizers leave GatherND tables in fp32, and the code table is the largest
    tensor (n_codes x 64: 93k of ~0.5M parameters on synth, ~220k on MIMIC-III), so without this
    the int8 file stays near 46% of fp32. Per-row symmetric scales keep the error <= half a step of
    each row's own range. The DequantizeLinear runs on a constant and is folded at session start.

    Returns:
        The number of tables converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    converted = 0
    for init in list(graph.initializer):
        if consumers.get(init.name, set()) - {"Gather", "GatherND"} or init.name not in consumers:
            continue
        table = numpy_helper.to_array(init)
        if table.dtype != np.float32 or table.ndim != 2 or table.size < min_size:
            continue
        scale = (np.abs(table).max(axis=1) / 127).astype(np.float32)  # [V]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend([numpy_helper.from_array(q, init.name + "_int8"),
                                  numpy_helper.from_array(scale, init.name + "_scale")])
        graph.node.insert(0, helper.make_node("DequantizeLinear", [init.name + "_int8", init.name + "_scale"],
                                              [init.name], axis=0, name=init.name + "_dequantize"))
        converted += 1
    onnx.save(model, str(path))
    return converted


def fold_constant_concats(path: str | Path) -> int:
    """Replace each Concat of constants (an initializer + a ConstantOfShape row) by one initializer,
    in place, so the padded tables reach `quantize_embeddings` as GatherND initializers.

    Returns:
        The number of Concat nodes folded.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded, keep = 0, []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in const:
            value = numpy_helper.to_array(node.attribute[0].t) if node.attribute else np.zeros(1, np.float32)
            const[node.output[0]] = np.full(tuple(const[node.input[0]]), value.reshape(-1)[0], dtype=value.dtype)
            keep.append(node)
        elif node.op_type == "Concat" and all(i in const for i in node.input):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            table = np.concatenate([const[i] for i in node.input], axis=axis)
            const[node.output[0]] = table
            graph.initializer.append(numpy_helper.from_array(table, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in keep if n.op_type != "ConstantOfShape" or n.output[0] in used]
    used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    onnx.save(model, str(path))
    return folded
