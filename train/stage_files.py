"""The run directory's files between stages: what the student stage reads of RUN/teacher, and the
RUN/student* directories it writes and `export` reads.

    load_teacher_features(run_dir, samples)    # RUN/teacher/features.safetensors rows, standardised
    teacher_probabilities(run_dir, samples)    # the teacher's head on its cached features (kd targets)
    check_stage_file(stage_dir, name, stage)   # the sha256 its stage recorded, or refused
    write_student_dir(out, model, encoder, threshold, extra, result)   # all at once, never half-written
    load_student(directory)                    # (Student, Encoder, threshold), checked
    student_dir_name(distill, seed, train_seed)

Split from distill.py (the training recipe) at the seam between training and the files it shares.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leader_edge.bedside.encoding import Encoder
from leader_edge.data.splits import Sample
from leader_edge.errors import StateError
from leader_edge.files import atomic_directory
from leader_edge.train.student import Student, StudentConfig
from leader_edge.train.teacher_data import FEATURES, sample_key


def load_teacher_features(run_dir: Path, samples: dict[str, list[Sample]]) -> dict[str, np.ndarray]:
    """Rows of RUN/teacher/features.safetensors in the order of `samples` (per split), standardised
    with the training rows' mean and std.

    Raises:
        RuntimeError: the file is missing, or a sample has no feature row.
    """
    from safetensors import safe_open

    path = run_dir / "teacher" / FEATURES
    if not path.exists():
        raise StateError(f"{path} not found; run the teacher stage first (`leader-edge train --stage teacher`) or pass --no-distill")
    check_stage_file(run_dir / "teacher", FEATURES, "teacher")
    out: dict[str, np.ndarray] = {}
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise StateError(f"{path} cannot be read ({e}); re-run `leader-edge train --stage teacher`") from None
    with f:
        keys = json.loads((f.metadata() or {}).get("keys", "{}"))
        for split in ("train", "val"):
            if split not in keys:
                raise StateError(f"{path} has no {split!r} keys in its metadata; re-run the teacher stage")
            rows = {k: i for i, k in enumerate(keys[split])}
            missing = [sample_key(s) for s in samples[split] if sample_key(s) not in rows]
            if missing:
                raise StateError(
                    f"{path}: {len(missing)} {split} sample(s) have no teacher feature (e.g. {missing[0]!r}); "
                    "the teacher was cached for another dataset, split seed or sampling - re-run the teacher stage"
                )
            table = f.get_tensor(split).astype(np.float32)
            out[split] = table[[rows[sample_key(s)] for s in samples[split]]]
    mean, std = out["train"].mean(0), out["train"].std(0) + 1e-6
    return {k: (v - mean) / std for k, v in out.items()}


def teacher_probabilities(run_dir: Path, samples: list[Sample]) -> np.ndarray:
    """float32 [N, n_meds]: the teacher's probabilities for `samples` - its head applied to its
    cached (raw) features, so nothing is recomputed. Output-level distillation's targets.

    Raises:
        RuntimeError: no teacher adapter, a teacher trained with a counting prior (its offsets
            are not cached), or a sample without a feature row.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from leader_edge.train.teacher_model import ADAPTER

    config = json.loads((run_dir / "teacher" / "config.json").read_text(encoding="utf-8"))
    if config.get("teacher", {}).get("prior", "none") != "none":
        raise StateError("kd > 0 needs a teacher trained with prior='none' (its logits are the head alone)")
    head = load_file(str(run_dir / "teacher" / ADAPTER))
    w, b = head["head.weight"].astype(np.float32), head["head.bias"].astype(np.float32)
    with safe_open(str(run_dir / "teacher" / FEATURES), framework="numpy") as f:
        rows = {k: i for i, k in enumerate(json.loads(f.metadata()["keys"])["train"])}
        missing = [sample_key(s) for s in samples if sample_key(s) not in rows]
        if missing:
            raise StateError(f"{len(missing)} training sample(s) have no teacher feature (e.g. {missing[0]!r}); re-run the teacher stage")
        x = f.get_tensor("train").astype(np.float32)[[rows[sample_key(s)] for s in samples]]
    return (1 / (1 + np.exp(-(x @ w.T + b)))).astype(np.float32)


def check_stage_file(stage_dir: Path, name: str, stage: str) -> None:
    """Refuse a stage output whose sha256 differs from the one its stage recorded in metrics.json
    (a flipped byte, a truncated copy, a file from another run). Outputs written before digests
    were recorded pass unchecked."""
    from leader_edge.files import sha256

    try:
        want = json.loads((stage_dir / "metrics.json").read_text(encoding="utf-8")).get("files", {}).get(name)
    except (FileNotFoundError, json.JSONDecodeError):
        raise StateError(f"{stage_dir / 'metrics.json'} is missing or damaged: the {stage} stage did not finish; "
                           f"re-run `leader-edge train --stage {stage}`") from None
    if want is not None and sha256(stage_dir / name) != want:
        raise StateError(f"{stage_dir / name} does not match the sha256 its stage recorded in metrics.json (damaged or "
                           f"replaced); re-run `leader-edge train --stage {stage}`")


def save_student(out: Path, model: Student, encoder: Encoder, threshold: float, extra: dict) -> None:
    """model.safetensors + config.json (model config, vocabularies, profile fields, threshold)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"student": model.config.to_json(), "encoder": encoder.to_json(), "threshold": threshold,
              "profile_fields": encoder.profile_fields, **extra}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_student_dir(out: Path, model: Student, encoder: Encoder, threshold: float, extra: dict, result: dict,
                      more=None) -> None:
    """Write a student directory all at once: weights and config (`save_student`), `more(tmp)`'s
    files, then metrics.json (`result` + the sha256 of the weights and config, checked before
    reuse). Built in a hidden temp directory beside `out` and renamed over it: never half-written."""
    from leader_edge.files import sha256

    with atomic_directory(out, marker="config.json", what="student") as tmp:
        save_student(tmp, model, encoder, threshold, extra)
        if more is not None:
            more(tmp)
        result["files"] = {n: sha256(tmp / n) for n in ("model.safetensors", "config.json", "predictions-test.csv")
                           if (tmp / n).exists()}  # the predictions: what `evaluate --run` scores
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def load_student(directory: str | Path, *, backend: str = "auto") -> tuple[Student, Encoder, float]:
    """(model in eval mode on CPU, encoder, threshold) from a RUN/student* directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").exists() or not (d / "model.safetensors").exists():
        raise StateError(f"{d} has no config.json/model.safetensors; train it with `leader-edge train --stage student`")
    if (d / "metrics.json").exists():
        for name in ("model.safetensors", "config.json"):  # both recorded by write_student_dir
            check_stage_file(d, name, "student")
    try:  # a student whose metrics.json predates the digests, or has none: damage named all the same
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        model = Student(StudentConfig.from_json(config["student"], backend=backend))
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model.eval(), Encoder.from_json(config["encoder"]), float(config["threshold"])
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise StateError(f"{d}: config.json or model.safetensors is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else e!r}); re-run `leader-edge train --stage student`") from None


def student_dir_name(distill: bool, seed: int, train_seed: int | None = None) -> str:
    """RUN/<name>: "student" / "student-nodistill" for the run's own seed, "<that>.seed-N" for
    another training seed of the same split (`leader-edge train --seeds K`)."""
    name = "student" if distill else "student-nodistill"
    return name if train_seed is None or train_seed == seed else f"{name}.seed-{train_seed}"
