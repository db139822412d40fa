"""The frequency baseline as a student directory, so it exports and serves like any trained model.

    write_frequency_student(data_dir, run_dir, seed=42, protocol="leader")   # -> RUN/frequency/

A `Student` whose counting prior is the frequency baseline with the rule, smoothing and threshold
chosen on validation (exactly `evaluate --baseline`'s model) and whose learned terms are all 0 IS
that baseline: `tests/train/test_distill.py` checks the probabilities match to 2e-6. Written beside
the trained students, `leader-edge export --run RUN --model frequency` turns it into a bundle, so
`predict` and `evaluate --truth` score counting on any visits file, and a deployment can serve it
when validation prefers it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from leader_edge.evaluation import metrics
from leader_edge.data.dataset import load_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.bedside.encoding import KINDS, Encoder
from leader_edge.train.distill import DistillConfig, code_limit, predict
from leader_edge.train.stage_files import write_student_dir
from leader_edge.train.student import Student, StudentConfig
from leader_edge.train.student_init import frequency_prior

NAME = "frequency"


def frequency_student(ds, splits, encoder: Encoder, *, seed: int) -> tuple[Student, float]:
    """(the baseline as a Student in eval mode, the baseline's validation-tuned threshold)."""
    tables, _ = frequency_prior(ds, splits, encoder, seed=seed, out_of_fold=False)  # one baseline fit, no refits
    threshold = tables["threshold"]
    model = Student(StudentConfig(encoder.n_codes, encoder.n_meds, encoder.n_profile_ids, encoder.med_offset,
                                  max_visits=encoder.max_visits, prior="frequency", prior_rule=tables["rule"], wide="none"))
    model.set_prior(tables["table"], tables["weight"], tables["global"], tables["global_weight"])
    with torch.no_grad():
        model.head_weight.zero_()
        model.head_bias.zero_()
    return model.eval(), threshold


def write_frequency_student(data_dir: Path, run_dir: Path, *, seed: int = 42, protocol: str = "leader",
                            config: DistillConfig | None = None) -> dict:
    """Write RUN/frequency (config.json, model.safetensors, metrics.json with digests); returns the metrics."""
    config = config or DistillConfig()
    data_dir, run_dir = Path(data_dir).resolve(), Path(run_dir)
    ds = load_dataset(data_dir)
    splits = dataset_splits(ds, seed=seed, train_all_visits=config.train_all_visits, protocol=protocol)
    train_ids = {s.patient_id for s in splits["train"]}
    encoder = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, [v for v in ds.visits if v.patient_id in train_ids],
                                  max_visits=config.max_visits, max_codes=code_limit(ds, config))
    model, threshold = frequency_student(ds, splits, encoder, seed=seed)
    ddi = metrics.ddi_matrix(ds.ddi, encoder.codes["medication"])
    result = {"model": NAME, "threshold": threshold, "seed": seed, "protocol": protocol,
              "rule": model.config.prior_rule, "n_params": 0}
    for split in ("val", "test"):
        prob = predict(model, encoder.encode([s.visits for s in splits[split]]), torch.device("cpu"))
        truth = encoder.multi_hot([s.visits for s in splits[split]]) > 0
        result[split] = metrics.score(truth, prob, threshold, ddi)
    write_student_dir(run_dir / NAME, model, encoder, threshold, {"distill": False, "seed": seed, "protocol": protocol,
                                                                  "data": str(data_dir), "baseline": "frequency"}, result)
    return result

