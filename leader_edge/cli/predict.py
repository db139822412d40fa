"""`leader-edge predict`: recommendations from a bundle and a visits CSV, without torch."""

from __future__ import annotations

from pathlib import Path

import click

from leader_edge.cli import FiniteRange, InputError, user_errors


@click.command()
@click.option("--bundle", required=True, envvar="LEADER_EDGE_BUNDLE",
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory from `leader-edge export`.")
@click.option("--input", "input_path", required=True, help="visits.csv (canonical format), or - for standard input.")
@click.option("--out", "--output", "output", default="-", show_default=True, help="Recommendations file, or - for standard output.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--all-visits", is_flag=True, help="Predict every visit (with the visits before it), not only each patient's last.")
@click.option("--top-k", type=click.IntRange(min=1), help="Recommend the K most probable medications instead of thresholding.")
@click.option("--threshold", type=FiniteRange(0, 1), help="Decision threshold [default: the bundle's, tuned on validation].")
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(min=1), help="Patients per model call.")
@click.option("--trust", envvar="LEADER_EDGE_TRUST", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): refuse a bundle that is not signed by it (`export --sign`).")
@click.option("--allow-unknown", is_flag=True,
              help="Write the recommendations even when more than half of the codes are unknown to the bundle.")
@click.option("--explain", is_flag=True,
              help="With --format jsonl: per recommended medication, the codes that drove it and their share of the logit.")
@user_errors
def predict(bundle: Path, input_path: str, output: str, fmt: str, all_visits: bool, top_k: int | None,
            threshold: float | None, batch_size: int, trust: Path | None, allow_unknown: bool, explain: bool) -> None:
    """Recommend medications for each patient's last visit of a visits CSV.

    Output columns: patient_id, visit_id, medications (';'-joined, most probable first), scores
    (code:prob;...), ddi_warnings (interacting pairs A+B within the recommendation), unknown_codes
    (codes the model did not read, counted and ignored: codes it never saw, and codes beyond its
    per-visit limit - the bundle's encoder.max_codes diagnoses, procedures and medications). The CSV
    is a --predictions file for `leader-edge evaluate`.

    Nothing is written unless the whole input is valid; an --out that is the input file is
    refused; SIGTERM/SIGINT leave no temp file (exit 143/130). A file whose codes are mostly
    (> 50%) unknown to the bundle is refused unless --allow-unknown. The bundle is refused unless it
    proves itself: every file and manifest field against its digest, the manifest's meaning against
    the model, and a self-test batch recorded at export.

    \b
    Examples:
      leader-edge predict --bundle bundle --input visits.csv --out recs.csv
      cat visits.csv | leader-edge predict --bundle bundle --input - --format jsonl --top-k 10
      leader-edge predict --bundle bundle --trust key.pub.pem --input visits.csv --out recs.csv
      leader-edge predict --bundle bundle --input visits.csv --format jsonl --explain --top-k 5
    """
    from leader_edge.bedside.predict_file import MAX_UNKNOWN_SHARE, predict_file
    from leader_edge.bedside.runtime import Bundle
    from leader_edge.signals import Interrupted

    if explain and fmt != "jsonl":
        raise InputError("--explain writes nested explanations: add --format jsonl")
    if top_k is not None and threshold is not None:
        raise click.UsageError("--top-k and --threshold are exclusive: --top-k recommends the K most probable "
                               "medications whatever their probability (the threshold was ignored)")
    model = Bundle.load(bundle, trust=trust)
    explainer = None
    if explain:
        from leader_edge.bedside.explain import Explainer

        explainer = Explainer(model)
    try:
        stats = predict_file(model, input_path, output, fmt=fmt, all_visits=all_visits, top_k=top_k,
                             threshold=threshold, batch_size=batch_size,
                             max_unknown=None if allow_unknown else MAX_UNKNOWN_SHARE, explainer=explainer)
    except Interrupted as e:
        click.echo(f"predict: stopped by {e.name}; nothing written (the temp file is removed)", err=True)
        e.reported = True  # the group's generic line would say it again
        raise
    summary = (f"{stats['visits']:,} visit(s) of {stats['patients']:,} patient(s) predicted; "
               f"{stats['unknown_codes']:,} unknown code(s) ignored in {stats['visits_with_unknown']:,} visit(s)")
    if stats["codes_over_limit"]:
        cap = model.encoder.max_codes
        summary += (f"; {stats['codes_over_limit']:,} code(s) beyond the model's limit of {cap} per visit and kind "
                    f"ignored in {stats['visits_over_limit']:,} visit(s) (it reads the first {cap}; counted in "
                    "unknown_codes)")
    if stats["profile_values_unseen"]:
        summary += (f"; {stats['profile_values_unseen']:,} profile value(s) the bundle never saw read as unknown "
                    f"(e.g. {stats['profile_value_example']})")
    click.echo(summary + ("" if output == "-" else f"; wrote {output}"), err=True)
    if stats["unknown_codes"] > MAX_UNKNOWN_SHARE * stats["codes"]:
        click.echo(f"warning: {stats['unknown_codes'] / stats['codes']:.0%} of the codes are unknown to the bundle: "
                   "its recommendations rest on the few codes it knows and the profile", err=True)
