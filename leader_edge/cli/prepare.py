"""`leader-edge prepare mimic3|mimic4`: raw MIMIC tables -> canonical dataset directory."""

from __future__ import annotations

import time
from pathlib import Path

import click

from leader_edge.cli import FiniteRange, user_errors

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.argument("source", type=click.Choice(["mimic3", "mimic4"]))
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with the MIMIC tables (MIMIC-IV: the folder holding hosp/, or hosp/ itself).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset directory to write (replaced only if it holds a leader-edge dataset and nothing else).")
@click.option("--ndc-rxcui", type=_FILE, help="NDC -> RXCUI dict literal (GAMENet/SafeDrug ndc2rxnorm_mapping.txt). Required.")
@click.option("--rxcui-atc", type=_FILE, help="RXCUI -> ATC4 table with RXCUI and ATC4 columns (RXCUI2atc4.csv).")
@click.option("--med-level", default="atc3", show_default=True, type=click.Choice(["atc3", "rxcui"]),
              help="Medication codes: ATC level 3 (needs --rxcui-atc) or RXCUI.")
@click.option("--ddi", type=_FILE, help="DDI file: TWOSIDES drug-DDI.csv (needs --cid-atc) or a med_a,med_b pairs CSV.")
@click.option("--cid-atc", type=_FILE, help="PubChem CID -> ATC lines (SafeDrug drug-atc.csv), for a TWOSIDES --ddi.")
@click.option("--ddi-side-effects", default="least", show_default=True, type=click.Choice(["least", "most", "all"]),
              help="TWOSIDES side-effect types kept: the --ddi-top-k least frequent (what LEADER/SafeDrug's code does), most frequent, or all.")
@click.option("--ddi-top-k", default=40, show_default=True, type=click.IntRange(min=1), help="Side-effect types kept by --ddi-side-effects least|most.")
@click.option("--top-diagnoses", default=2000, show_default=True, type=click.IntRange(min=0), help="Keep the N most frequent diagnoses (0: all).")
@click.option("--top-medications", default=300, show_default=True, type=click.IntRange(min=0), help="Keep the N most frequent medications (0: all).")
@click.option("--min-visits", default=1, show_default=True, type=click.IntRange(min=1),
              help="Drop patients with fewer visits (GAMENet/SafeDrug: 2; LEADER keeps single-visit patients).")
@click.option("--sample-frac", default=1.0, show_default=True, type=FiniteRange(0, 1, min_open=True),
              help="Random share of patients to keep (LEADER used 0.15 on MIMIC-IV).")
@click.option("--sample-seed", default=42, show_default=True, type=int, help="Seed of --sample-frac.")
@click.option("--century", default=2100, show_default=True, type=int,
              help="M/D/YY dates are read as CENTURY+YY (MIMIC shifts dates into ~2100-2210).")
@user_errors
def prepare(source: str, root: Path, out: Path, **options) -> None:
    """Build a dataset directory from MIMIC-III or MIMIC-IV tables by the GAMENet/SafeDrug pipeline
    (see docs/MIMIC.md). Prints the filters applied and the dataset's statistics on stdout; logs go
    to stderr.

    \b
    Examples:
      leader-edge prepare mimic3 --root mimic-iii-1.4 --out data/m3 \\
        --ndc-rxcui ndc2rxnorm_mapping.txt --rxcui-atc RXCUI2atc4.csv \\
        --ddi drug-DDI.csv --cid-atc drug-atc.csv
      leader-edge prepare mimic4 --root mimiciv/2.2 --out data/m4 --sample-frac 0.15 \\
        --ndc-rxcui ndc2rxnorm_mapping.txt --rxcui-atc RXCUI2atc4.csv
      leader-edge prepare mimic3 --root mimic-iii-demo --out data/demo --med-level rxcui \\
        --ndc-rxcui ndc2rxnorm_mapping.txt
    """
    from leader_edge.data.dataset import write_dataset
    from leader_edge.data.sources.mimic import PrepareConfig, prepare_mimic, stats_table

    start = time.perf_counter()
    cfg = PrepareConfig(source=source, root=root, **options)
    ds = prepare_mimic(cfg)
    unnamed = ds.meta["unnamed_codes"]
    write_dataset(ds, out, source=source, options=cfg.options())
    click.echo(stats_table(ds.meta, unnamed=unnamed))
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s", err=True)
