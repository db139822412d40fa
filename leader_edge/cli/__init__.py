"""`leader-edge` command line. Thin: each subcommand lives in its own module, imported only
when that subcommand runs, so `leader-edge predict` never pays for torch."""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
from typing import Callable

import click

from leader_edge import __version__

# subcommand -> module under leader_edge.cli defining a click command of the same name.
COMMANDS = {
    "synth": "Generate a realistic synthetic dataset (or raw MIMIC-III-shaped tables).",
    "prepare": "Build a dataset directory from MIMIC-III or MIMIC-IV tables.",
    "train": "Train the teacher LLM and distil the student.",
    "evaluate": "Score recommendations (a file, a baseline, or a trained run).",
    "export": "Export a trained student to a validated (int8) ONNX bundle.",
    "predict": "Recommend medications from a bundle and a visits CSV (torch-free).",
    "serve": "Serve a bundle over HTTP: JSON and FHIR input, metrics, bundle swap (torch-free).",
}


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (FloatRange(0, 1) let "nan" through: every
    comparison with NaN is false, so `predict --threshold nan` recommended nothing, exit 0)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class InputError(click.ClickException):
    """Bad user input: message without traceback, exit status 2."""

    exit_code = 2


def user_errors(fn: Callable) -> Callable:
    """Turn the project's own errors (`leader_edge.errors`: bad options, bad files, a missing earlier
    step) and OSError (a missing file, a full disk) into one line without a traceback, exit 2.
    Anything else - a numpy shape error, CUDA out of memory, a broken invariant - is a bug or a
    resource failure and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from leader_edge.errors import LeaderEdgeError

        try:
            return fn(*args, **kwargs)
        except (LeaderEdgeError, OSError) as e:
            raise InputError(str(e)) from None

    return wrapper


# Commands that install their own signal handling: serve shuts down gracefully on SIGTERM (uvicorn).
OWN_SIGNALS = {"serve"}


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        """Run the subcommand; a SIGTERM or SIGINT (see `main`) is reported in one line, exit 143 / 130."""
        from leader_edge.signals import Interrupted

        try:
            return super().invoke(ctx)
        except Interrupted as e:
            if not getattr(e, "reported", False):
                click.echo(f"{ctx.invoked_subcommand}: stopped by {e.name}; the output it was writing is discarded and "
                           "its temp files removed (outputs finished before it are kept)", err=True)
            raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"leader_edge.cli.{name}")
        return getattr(module, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


# Environment fallbacks, one rule: every option of every command reads LEADER_EDGE_<COMMAND>_<OPTION>
# (e.g. LEADER_EDGE_SYNTH_PATIENTS=500, LEADER_EDGE_PREDICT_TOP_K=5); an option naming the same thing in
# several commands has one shared name instead: LEADER_EDGE_BUNDLE, _TRUST, _DATA, _CONFIG, _TEACHER.
# Process-wide settings: LEADER_EDGE_QUIET, LEADER_EDGE_LOG_LEVEL, LEADER_EDGE_CACHE (the model cache),
# LEADER_EDGE_SIGNAL_GRACE (seconds a command may still run after SIGTERM/SIGINT; signals.signals_raise).
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "LEADER_EDGE"})
@click.version_option(__version__, "--version", prog_name="leader-edge")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, envvar="LEADER_EDGE_QUIET",
              help="No progress bars (they are drawn only on a terminal anyway).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Medication recommendation distilled from an LLM, runnable at the bedside.

    \b
    Pipeline:
      leader-edge synth --out data/synth
      leader-edge evaluate --baseline frequency --data data/synth
      leader-edge train --data data/synth --out runs/r1
      leader-edge export --run runs/r1 --out bundle --int8
      leader-edge predict --bundle bundle --input visits.csv --out recs.csv
    """
    if quiet:
        from leader_edge.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # read by every progress bar, in this process and its children
    level = os.environ.get("LEADER_EDGE_LOG_LEVEL") or ("DEBUG" if verbose > 1 else "INFO" if verbose else "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand not in OWN_SIGNALS:
        from leader_edge.errors import ConfigError
        from leader_edge.signals import signals_raise

        # Until the command ends, SIGTERM and SIGINT raise signals.Interrupted, so every atomic writer and
        # temp directory removes its temporaries on the way out: the default SIGTERM action ends the
        # process at once (an export left its 3.9 MB fp32.onnx in .export-XXXX/ for good). A command
        # blocked in C (a collective) exits after LEADER_EDGE_SIGNAL_GRACE seconds instead.
        try:
            ctx.with_resource(signals_raise())
        except ConfigError as e:  # a bad LEADER_EDGE_SIGNAL_GRACE
            raise InputError(str(e)) from None
