"""`leader-edge export`: a trained student -> a validated (int8) ONNX bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leader_edge.cli import user_errors


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write (a new one, or an older bundle).")
@click.option("--int8", is_flag=True, help="Quantize to int8 (dynamic and static QDQ are tried; the better is kept).")
@click.option("--calibration-samples", default=512, show_default=True, type=click.IntRange(min=1),
              help="Training samples that calibrate static int8 quantization.")
@click.option("--force", is_flag=True, help="Write the bundle even if it fails the validation gate (Jaccard drop > 0.01).")
@user_errors
def export(run_dir: Path, out: Path, int8: bool, calibration_samples: int, force: bool) -> None:
    """Export RUN/student to BUNDLE (model.onnx + manifest.json), validated against the torch student
    on the validation split: max |dp|, Jaccard and PRAUC deltas are printed, and a Jaccard drop
    over 0.01 is refused unless --force.

    \b
    Examples:
      leader-edge export runs/r1 --out bundle
      leader-edge export runs/r1 --out bundle-int8 --int8 --calibration-samples 1024
    """
    from leader_edge.export.bundle import export_bundle

    manifest = export_bundle(run_dir, out, int8=int8, calibration_samples=calibration_samples, force=force)
    v = manifest["validation"]
    for name, c in v["candidates"].items():
        click.echo(f"{name:13s} Jaccard {c['jaccard']:.4f}  PRAUC {c['prauc']:.4f}  {c['ms_per_patient']:.3f} ms/patient "
                   f"(batch 1)  {c['bytes'] / 1024:,.0f} KiB", err=True)
    click.echo(f"kept {manifest['model']['variant']}: max |dp| {v['max_abs_dp']:.2e}, Jaccard delta {v['jaccard_delta']:+.4f} "
               f"(gate: drop <= {v['max_jaccard_drop']}), PRAUC delta {v['prauc_delta']:+.4f} on {v['n_visits']} validation visits",
               err=True)
    if v.get("forced"):
        click.secho("WARNING: this bundle FAILED the validation gate and was written only because of --force", fg="red", err=True)
    click.echo(json.dumps({"bundle": str(out), "variant": manifest["model"]["variant"], "sha256": manifest["model"]["sha256"]}))
