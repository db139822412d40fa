"""Streaming a visits file through a proven bundle into an output file: `predict_file`. No torch.

`leader_edge.bedside.runtime` loads, proves and scores a bundle; this module is what `leader-edge predict`
does with one: read the visits in chunks of whole patients (`visit_stream.read_patients`, the one
visits reader), score each with `Bundle.predict` (`Encoder.encode_table`, the one encoder, then the
model), format it with the one recommendations writer (`recs.csv_lines`, or `recs.json_records`
for jsonl) and write it so that nothing is lost or left behind (see `predict_file`). `runtime`
never imports this module.

    bundle = Bundle.load("bundle/")                      # leader_edge.bedside.runtime: proves it or refuses it
    stats = predict_file(bundle, "visits.csv", "recs.csv")   # "-" for standard input / output

Memory is set by the chunk and batch sizes (~0.5 GB peak for the whole CLI on 100k synth
patients, most of it onnxruntime's arena) plus the file-wide duplicate checks, measured at ~60
bytes per row of peak growth (155 MB after 1M rows against 97 MB after 20k; ~0.6 GB more at 10M rows).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np

from leader_edge.errors import DataError
from leader_edge.files import copy_into, held_temp, output_mode, output_target
from leader_edge.signals import signals_raise
from leader_edge.progress import progress
from leader_edge.bedside.recs import Scored, csv_lines, header, json_records
from leader_edge.bedside.runtime import Bundle
from leader_edge.bedside.visit_stream import read_patients

# The name its warnings carried before this module left runtime.py: the CLI's stderr shows it
# ("WARNING leader_edge.bedside.runtime: removed ..."), and a logging config may select it.
log = logging.getLogger("leader_edge.bedside.runtime")

# `predict` refuses a file when more than this share of the codes the model reads are unknown to it
# (--allow-unknown writes it anyway). A few new codes are expected (rare codes outside the training
# vocabulary; 0 on the 100k synth patients of the benchmark); half of them unknown is another
# vocabulary (MIMIC-IV's ICD9_/ICD10_ codes against a MIMIC-III bundle: 100%), whose
# recommendations would rest on the profile and the few codes the model knows.
MAX_UNKNOWN_SHARE = 0.5


def predict_file(bundle: Bundle, input_path: str, output: str, *, fmt: str = "csv", all_visits: bool = False,
                 top_k: int | None = None, threshold: float | None = None, batch_size: int = 1024,
                 max_unknown: float | None = MAX_UNKNOWN_SHARE, explainer=None) -> dict:
    """Stream `input_path` ("-" = stdin) through the bundle into `output` ("-" = stdout).

    Nothing is lost or left behind:
    - an `output` that is the input file (by any path: a symlink, `./x` for `x`, a hard link), lies
      in the bundle directory or is a directory is refused before anything is written;
    - the output goes to a hidden temp file first (beside `output`, or in the temp dir for stdout),
      renamed (or copied to stdout) only when the whole input was read without error; the rename
      is atomic, so `output` is either the old file or the complete new one;
    - SIGTERM and SIGINT raise `leader_edge.signals.Interrupted` (exit 128 + signal) and the temp file
      is removed; the temp file of a run killed outright (SIGKILL, power loss) carries the host and
      process id in its name (`.NAME.leader-edge.HOST.PID.XXXX.tmp`) and is removed by the next run
      once that process is gone and holds no lock on it, or else ignored (`files.remove_stale_temps`);
    - a new output gets the mode the umask gives (0644 under umask 022), a replaced one keeps its mode;
    - a failed write (disk full, quota) names the output and what to do.

    Args:
        max_unknown: refuse the file when more than this share of the codes the model reads are
            outside its vocabulary (None: never). See `MAX_UNKNOWN_SHARE`.
        explainer: a `leader_edge.bedside.explain.Explainer` of the bundle: each jsonl record gets
            `explanations` (per recommended medication, its logit's parts). jsonl only.

    Returns:
        {"patients", "visits", "codes" (as written, in what the model read), "unknown_codes",
        "visits_with_unknown", "codes_over_limit", "visits_over_limit", "profile_values_unseen" (values
        of the scored visits' profile fields the bundle never saw, read as unknown; with
        "profile_value_example" when any)}: the unknown counts are
        codes outside the vocabulary, the over-limit ones known codes beyond `encoder.max_codes`
        per visit and kind; the output's `unknown_codes` column holds both.

    Raises:
        DataError: a bad input row (file, line, column), an output refused above, a failed write,
            or more than `max_unknown` of the codes unknown.
        Interrupted: SIGTERM or SIGINT arrived; nothing was written.
    """
    target, in_place = None if output == "-" else Path(output), False
    if target is not None:
        _check_output(target, input_path, bundle.path)
        target, in_place = output_target(target)  # a link is written through, a device or FIFO in place
    if input_path == "-":
        stream, name = sys.stdin.buffer, "<stdin>"
    else:
        try:
            stream, name = open(input_path, "rb", buffering=1 << 20), input_path
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(input_path, "no such file", fix="pass a visits CSV, or - to read standard input") from None
    directory = target.parent if target is not None and not in_place else Path(tempfile.gettempdir())
    stem = target.name if target is not None else "predict"
    stats = {"patients": 0, "visits": 0, "codes": 0, "unknown_codes": 0, "visits_with_unknown": 0,
             "codes_over_limit": 0, "visits_over_limit": 0, "profile_values_unseen": 0}
    with stream, signals_raise(), contextlib.ExitStack() as stack:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            held = stack.enter_context(held_temp(directory / stem))  # removed on any error or signal
        except OSError as e:
            raise _write_error(e, target, directory) from None
        if target is not None and not in_place:  # created 0600, as mkstemp would
            os.fchmod(held.fd, output_mode(target))
        out = os.fdopen(held.fd, "wb", closefd=False)  # held.close() closes it (and releases the hold)

        def put(data: bytes | None) -> None:
            """Write `data`, or (None) flush and close; a failure names the output."""
            try:
                if data is None:
                    out.close()
                    held.close()  # a full disk may only show at the flush (or, on NFS, only at close)
                else:
                    out.write(data)
            except OSError as e:
                raise _write_error(e, target, directory) from None

        try:
            _stream(bundle, stream, name, put, stats, fmt=fmt, all_visits=all_visits, top_k=top_k,
                    threshold=threshold, batch_size=batch_size, explainer=explainer)
            put(None)
        finally:
            if not out.closed:  # after a failure: the buffer cannot be written either
                with contextlib.suppress(OSError):
                    out.close()
        share = stats["unknown_codes"] / max(stats["codes"], 1)
        if max_unknown is not None and share > max_unknown:
            raise DataError(name, f"{stats['unknown_codes']:,} of the {stats['codes']:,} codes written in the visits the model reads "
                                  f"({share:.0%}) are not in the vocabulary of the bundle ({bundle.path}): the visits "
                                  "use other codes than it was trained on (e.g. MIMIC-IV codes, ICD9_/ICD10_ "
                                  "prefixed, for a MIMIC-III bundle); nothing was written",
                            fix="score them with a bundle trained on this vocabulary, or map the codes to it; "
                                "--allow-unknown writes the recommendations anyway")
        if target is None:
            with open(held.path, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            os.unlink(held.path)
        else:
            try:
                if in_place:
                    copy_into(held.path, target)
                    os.unlink(held.path)
                else:
                    os.replace(held.path, target)
            except OSError as e:
                raise _write_error(e, target, directory) from None
    return stats


def _stream(bundle: Bundle, stream, name: str, put, stats: dict, *, fmt: str, all_visits: bool, top_k: int | None,
            threshold: float | None, batch_size: int, explainer=None) -> None:
    """Read, score and `put` the formatted chunks, counting into `stats`."""
    from concurrent.futures import ThreadPoolExecutor

    if fmt == "csv":
        put(header())
    decide = {"threshold": bundle.threshold if threshold is None else threshold, "top_k": top_k, "ddi": bundle.ddi}
    seen_values = {f: set(v) for f, v in bundle.encoder.profile_values.items()}

    def emit(scored: Scored, chunk) -> None:
        n_patients = len(chunk)
        if fmt == "csv":
            put(csv_lines(bundle.med_codes, scored, **decide))
        else:
            rows = list(json_records(bundle.med_codes, scored, **decide))
            if explainer is not None:  # the rows Bundle.predict scored: every visit, or each patient's last
                ends = np.arange(len(chunk.visit_ids)) if all_visits else chunk.starts[1:] - 1
                for row, why in zip(rows, explainer.explain_table(chunk, ends, [r["medications"] for r in rows])):
                    row["explanations"] = why
            put("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode())
        over = scored.over_limit if scored.over_limit is not None else np.zeros_like(scored.unknown)
        unknown = scored.unknown - over
        stats["patients"] += n_patients
        stats["visits"] += len(scored.visit_ids)
        stats["codes"] += int(scored.codes.sum()) if scored.codes is not None else 0
        stats["unknown_codes"] += int(unknown.sum())
        stats["visits_with_unknown"] += int((unknown > 0).sum())
        stats["codes_over_limit"] += int(over.sum())
        stats["visits_over_limit"] += int((over > 0).sum())
        # a profile value the bundle never saw reads as the field's "unknown" id: counted, one example kept
        rows = range(len(chunk.visit_ids)) if all_visits else (chunk.starts[1:] - 1).tolist()
        for f, known in seen_values.items():
            column = chunk.profile.get(f)
            unseen = [column[i] for i in rows if column[i] and column[i] not in known] if column is not None else []
            if unseen:
                stats["profile_values_unseen"] += len(unseen)
                stats.setdefault("profile_value_example", f"{f}={unseen[0]!r}")

    # onnxruntime releases the GIL: the model scores chunk i while this thread formats chunk
    # i - 1 and reads and encodes chunk i + 1 - about equal shares on 100k synth patients with
    # the shipped student (2.8 s of reading, encoding and formatting against ~3 s of model, one
    # core each). On a loaded machine that gets about one core there is no gain (2-core VM at
    # load ~3: 6.98-7.00 s vs 6.45-6.80 s in one thread); idle, the two overlap.
    size = _file_size(stream)  # progress in bytes read of a file (rate and ETA); patients for a pipe
    with ThreadPoolExecutor(1) as pool, progress(size, desc="predict", unit="B" if size else "patient") as bar:
        def done(scored: Scored, chunk) -> None:
            emit(scored, chunk)
            bar.update(stream.tell() - bar.n if size else len(chunk))

        pending = None
        for chunk in read_patients(stream, name):
            future = pool.submit(bundle.predict, chunk, all_visits=all_visits, batch_size=batch_size,
                                 encoded=bundle.encoder.encode_table(chunk))
            if pending is not None:
                done(pending[0].result(), pending[1])
            pending = (future, chunk)
        if pending is not None:
            done(pending[0].result(), pending[1])


def _file_size(stream) -> int | None:
    """Bytes of a regular, seekable input file; None for a pipe or a terminal."""
    try:
        st = os.fstat(stream.fileno())
        return st.st_size if stat.S_ISREG(st.st_mode) and stream.seekable() else None
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# The output file: never the input, never left half-written


def _check_output(target: Path, input_path: str, bundle_dir: Path) -> None:
    """Refuse an output path that is the input file, lies in the bundle or is a directory."""
    if input_path != "-" and (target.resolve() == Path(input_path).resolve()
                              or target.exists() and Path(input_path).exists() and os.path.samefile(target, input_path)):
        raise DataError(target, f"is the --input file ({input_path}): writing the recommendations there would "
                                "replace the visits; nothing was written", fix="pass another --out path")
    inside = target.resolve()
    if bundle_dir.resolve() in (inside, *inside.parents):
        raise DataError(target, f"is inside the bundle directory {bundle_dir}; a bundle holds only its own files",
                        fix="write the recommendations outside the bundle")
    if target.is_dir():
        raise DataError(target, "is a directory", fix="pass a file path as --out, e.g. recs.csv")


def _write_error(e: OSError, target: Path | None, directory: Path) -> DataError:
    """A failed write or rename of the output, naming it (the temp file is removed by the caller)."""
    what = f"{e.strerror or e}" + (f" ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else "")
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if target is None:
        fix = "free space there, or set TMPDIR to a directory on a disk with space" if full else \
            "set TMPDIR to a writable directory"
        return DataError(directory, f"cannot hold the recommendations before they go to standard output: {what}; "
                                    "nothing was written", fix=fix)
    fix = f"free space on the disk that holds {directory}, or pass an --out on another disk" if full else \
        f"check that {directory} is writable, or pass another --out"
    return DataError(target, f"cannot be written: {what}; nothing was written (the temp file in {directory} is removed)",
                     fix=fix)
