"""Student -> ONNX (fp32) -> int8: path in, path out.

    export_onnx(model, path)                       # torch.onnx dynamo exporter, reference ops
    quantize_dynamic_int8(src, dst)                # int8 weights, activations quantized at run time
    quantize_static_int8(src, dst, calibration)    # QDQ, activation ranges calibrated on samples

Every input axis but the profile width is dynamic: batch B, visit slots K and the code widths
Ld/Lp/Lm (the encoder pads to the longest row of a batch, so widths differ from batch to batch).
The exported graph is `Student.predict_proba` (probabilities): the runtime thresholds them as they come.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

from leader_edge.encoding import INPUT_NAMES
from leader_edge.export.forms import fold_constant_concats, last_query_forward, padded_embedding_bag, padded_wide_logits

log = logging.getLogger(__name__)

OPSET = 18  # onnxruntime 1.32 runs it everywhere; the dynamo exporter's default


def _reference_kernels(*, reference_bag: bool = False) -> types.SimpleNamespace:
    """`leader_edge.kernels` look-alike that always runs the pure-torch references.

    The public kernels check `codes.max() < V` on CPU with a Python `int(...)`, a data-dependent
    branch that torch.export cannot trace; the references are the spec and export cleanly. The
    embedding bag is the reference's padded-gather form (`export/forms.py`: same values, no mask pass)."""
    from leader_edge.kernels import reference

    return types.SimpleNamespace(
        embedding_bag=lambda weight, codes, mode="sum", backend="torch": (
            reference.embedding_bag if reference_bag else padded_embedding_bag)(weight, codes, mode),
        linear_sigmoid=lambda x, weight, bias=None, backend="torch": reference.linear_sigmoid(x, weight, bias),
        linear_bce_with_logits=lambda x, w, b, t, backend="torch": reference.linear_bce_with_logits(x, w, b, t),
    )


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


def export_onnx(model, path: str | Path, inputs: dict[str, np.ndarray]) -> Path:
    """Export `model.predict_proba` to ONNX with dynamic batch, visit and code axes.

    Args:
        model: a `leader_edge.train.student.Student` (any device; exported on CPU, eval mode).
        path: the .onnx file to write (its weights inline, one file).
        inputs: example inputs by name (`example_inputs` or an encoded batch), int64.

    Returns:
        `path`.
    """
    import torch

    from leader_edge.train import student as student_module

    class _Proba(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, diagnoses, procedures, medications, profile, visit_mask):
            return self.inner.predict_proba(diagnoses, procedures, medications, profile, visit_mask)

    wrapper = _Proba(model.cpu().eval())
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
    with torch.no_grad():
        with mock.patch.object(student_module, "kernels", _reference_kernels(reference_bag=True)):
            want = wrapper(*args)
    inner, block = wrapper.inner, wrapper.inner.visit_block
    # On the instance, not the class: padded_wide_logits hands the mean and low-rank variants back to
    # Student.wide_logits, which a class-level patch would turn into itself (infinite recursion).
    with mock.patch.object(student_module, "kernels", _reference_kernels()), \
            mock.patch.object(inner, "wide_logits", lambda d, p, m: padded_wide_logits(inner, d, p, m)), \
            mock.patch.object(block, "forward", lambda x, mask: last_query_forward(block, x, mask)), torch.no_grad():
        diff = float((wrapper(*args) - want).abs().max())
        if diff > 1e-6:
            raise RuntimeError(f"the export forms differ from the student by {diff:.2e} on the example batch; "
                               "Student changed - update leader_edge/export/forms.py to match it")
        with warnings.catch_warnings(), _quiet_third_party():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter; failures still raise
            program = torch.onnx.export(
                wrapper, args, input_names=list(INPUT_NAMES), output_names=["probabilities"],
                dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, optimize=True, verbose=False,
            )
    program.save(str(path), external_data=False)
    fold_constant_concats(path)
    log.info("exported %s (%.1f KiB)", path, path.stat().st_size / 1024)
    return path


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
        raise ValueError("static quantization needs at least one calibration batch; raise --calibration-samples")
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
        raise ValueError(f"quantization source and destination are both {src}; write to a new path")


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
