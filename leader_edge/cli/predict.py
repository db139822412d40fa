"""`leader-edge predict`: recommendations from a bundle and a visits CSV, without torch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from leader_edge.cli import user_errors


@click.command()
@click.option("--bundle", required=True, envvar="LEADER_EDGE_BUNDLE",
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory from `leader-edge export`.")
@click.option("--input", "input_path", required=True, help="visits.csv (canonical format), or - for standard input.")
@click.option("--output", default="-", show_default=True, help="Recommendations file, or - for standard output.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--all-visits", is_flag=True, help="Predict every visit (with the visits before it), not only each patient's last.")
@click.option("--top-k", type=click.IntRange(min=1), help="Recommend the K most probable medications instead of thresholding.")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Decision threshold [default: the bundle's, tuned on validation].")
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1), help="Patients per model call.")
@click.option("--trust", envvar="LEADER_EDGE_TRUST", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): refuse a bundle that is not signed by it (`export --sign`).")
@user_errors
def predict(bundle: Path, input_path: str, output: str, fmt: str, all_visits: bool, top_k: int | None,
            threshold: float | None, batch_size: int, trust: Path | None) -> None:
    """Recommend medications for each patient's last visit of a visits CSV.

    Output columns: patient_id, visit_id, medications (';'-joined, most probable first), scores
    (code:prob;...), ddi_warnings (interacting pairs A+B within the recommendation), unknown_codes
    (codes the model never saw: counted and ignored). The CSV is a --predictions file for
    `leader-edge evaluate`. Nothing is written unless the whole input is valid. The bundle is
    refused unless it proves itself: every file and manifest field against its digest, the manifest's
    meaning against the model, and a self-test batch recorded at export.

    \b
    Examples:
      leader-edge predict --bundle bundle --input visits.csv --output recs.csv
      cat visits.csv | leader-edge predict --bundle bundle --input - --format jsonl --top-k 10
      leader-edge predict --bundle bundle --trust key.pub.pem --input visits.csv --output recs.csv
    """
    from leader_edge.runtime import Bundle, predict_file

    model = Bundle.load(bundle, trust=trust)
    stats = predict_file(model, input_path, output, fmt=fmt, all_visits=all_visits, top_k=top_k,
                         threshold=threshold, batch_size=batch_size)
    click.echo(f"{stats['visits']:,} visit(s) of {stats['patients']:,} patient(s) predicted; "
               f"{stats['unknown_codes']:,} unknown code(s) ignored in {stats['visits_with_unknown']:,} visit(s)"
               + ("" if output == "-" else f"; wrote {output}"), err=True)
