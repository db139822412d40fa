"""`leader-edge export`: a trained student -> a validated (int8) ONNX bundle that proves itself."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leader_edge.cli import user_errors


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run directory to read (from `leader-edge train --out RUN`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write (a new one, or an older bundle).")
@click.option("--model", "model_name", default="student", show_default=True,
              help="Student directory of the run to export (student, student-nodistill, student.seed-43, ...).")
@click.option("--int8", is_flag=True, help="Quantize to int8 (weights-only, dynamic and static QDQ are tried; the most accurate batch-invariant one is kept).")
@click.option("--calibration-samples", default=512, show_default=True, type=click.IntRange(min=1),
              help="Training samples that calibrate static int8 quantization.")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (unencrypted PEM): sign the bundle's digest (signature.json).")
@click.option("--force", is_flag=True, help="Write the bundle even if it fails the validation gate (Jaccard drop > 0.005).")
@user_errors
def export(run_dir: Path, out: Path, model_name: str, int8: bool, calibration_samples: int, sign_key: Path | None,
           force: bool) -> None:
    """Export RUN/MODEL (--run, --model) to the bundle directory --out (model.onnx, explain.onnx,
    names.json, selftest.json, manifest.json), validated against the
    torch student on the validation split: max |dp|, Jaccard and PRAUC deltas are printed, and a
    Jaccard drop over 0.005 is refused unless --force. A model whose probabilities depend on the batch
    (batch 1 vs 1024) is refused. The same run exports to a byte-identical bundle; its digest covers
    every file and manifest field, and `predict` checks it (and the signature, with --trust).

    \b
    Examples:
      leader-edge export --run runs/r1 --out bundle
      leader-edge export --run runs/r1 --out bundle-int8 --int8 --calibration-samples 1024
      leader-edge export --run runs/r1 --model student-nodistill --out bundle-nodistill
      openssl genpkey -algorithm ed25519 -out key.pem && openssl pkey -in key.pem -pubout -out key.pub.pem
      leader-edge export --run runs/r1 --out bundle --int8 --sign key.pem
    """
    from leader_edge.export.bundle import export_bundle

    manifest = export_bundle(run_dir, out, model=model_name, int8=int8, calibration_samples=calibration_samples,
                             force=force, sign=sign_key)
    v = manifest["validation"]
    for name, c in v["candidates"].items():
        click.echo(f"{name:13s} Jaccard {c['jaccard']:.4f}  PRAUC {c['prauc']:.4f}  batch 1 vs {v['batch_invariance']['batch_sizes'][1]} "
                   f"max |dp| {c['max_batch_dp']:.1e} ({'invariant' if c['batch_invariant'] else 'refused'})  "
                   f"{c['bytes'] / 1024:,.0f} KiB", err=True)
    click.echo(f"kept {manifest['model']['variant']}: max |dp| {v['max_abs_dp']:.2e}, Jaccard delta {v['jaccard_delta']:+.4f} "
               f"(gate: drop <= {v['max_jaccard_drop']}), PRAUC delta {v['prauc_delta']:+.4f} on {v['n_visits']} validation visits",
               err=True)
    if v.get("forced"):
        click.secho("WARNING: this bundle FAILED the validation gate and was written only because of --force", fg="red", err=True)
    click.echo(json.dumps({"bundle": str(out), "model": model_name, "variant": manifest["model"]["variant"],
                           "digest": manifest["digest"]["sha256"], "signed": sign_key is not None}))
