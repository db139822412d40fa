"""The teacher under torchrun: 2 CPU processes with gloo end with identical adapters, stop together, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

from leader_edge.data.dataset import write_dataset
from leader_edge.data.synth import synth_dataset


def _why(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines first (torchrun's summary alone names only a signal), then the tail."""
    lines = proc.stderr.splitlines()
    own = [ln for ln in lines if any(w in ln for w in ("Error", "terminate", "what():", "Traceback", "Abort", "Timeout (", "File \""))]
    return "\n".join(own[:40]) + "\n...\n" + proc.stderr[-1500:]


def test_teacher_ddp_two_processes_identical_adapters(tmp_path):
    data = write_dataset(synth_dataset(patients=30, seed=5), tmp_path / "synth", source="synth")
    config = tmp_path / "tiny.toml"
    config.write_text("[teacher]\nmax_tokens = 300\nbatch_size = 4\ngrad_accum = 2\ntiming_patients = 1\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "leader_edge", "train", "--data", str(data), "--out", str(run), "--stage", "teacher",
           "--teacher", "tiny", "--epochs", "2", "--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, _why(proc)
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    ddp = metrics["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    digests = ddp["adapter_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (run / "teacher" / "features.safetensors").is_file()


DIVERGING_SCORES = """
import faulthandler, json, os, sys
from pathlib import Path
faulthandler.dump_traceback_later(120, exit=True)  # a rank stuck in a collective prints where and exits
from leader_edge.evaluation import metrics
from leader_edge.train.teacher import run_teacher_stage
from leader_edge.train.teacher_config import TeacherConfig
data, run = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
# The validation PRAUC each rank computes, made to differ: rank 0's improves every epoch; rank 1's
# falls after the first, so on its own (patience 1) rank 1 would stop after epoch 2 with epoch 1's
# adapter while rank 0 trains a third epoch and waits for it in DDP's all-reduce.
own = {0: [0.5, 0.6, 0.7], 1: [0.5, 0.4, 0.3]}[rank]
seen = []
score = metrics.score
def per_rank_score(*args, **kwargs):
    out = score(*args, **kwargs)
    if len(seen) < len(own):  # the per-epoch validation calls; rank 0's final scoring is left alone
        out["prauc"] = own[len(seen)]
        seen.append(out["prauc"])
    return out
metrics.score = per_rank_score
config = TeacherConfig(teacher="tiny", max_tokens=200, batch_size=4, grad_accum=2, epochs=3, patience=1, timing_patients=1)
run_teacher_stage(data, run, config)
(run / f"seen-rank{rank}.json").write_text(json.dumps(seen))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip torch's C++ teardown, as the CLI does under torchrun (cli/train.py _leave_distributed_run)
"""


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it: torchrun starts each rank in a session of its
    own, so killing the launcher's process group leaves the ranks running (and holding their output)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_teacher_ddp_ranks_with_different_validation_scores_stop_together(tmp_path):
    data = write_dataset(synth_dataset(patients=30, seed=5), tmp_path / "synth", source="synth")
    script = tmp_path / "diverging.py"
    script.write_text(DIVERGING_SCORES)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(data), str(run)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=180)  # ~35 s when the ranks agree; each rank also gives up by itself after 120 s
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            raise AssertionError("the ranks did not finish within 180 s: one is waiting in a collective the other left")
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, _why(subprocess.CompletedProcess(cmd, proc.returncode, "", err))
    assert [json.loads((run / f"seen-rank{r}.json").read_text()) for r in (0, 1)] == [[0.5, 0.6, 0.7], [0.5, 0.4, 0.3]]
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    assert [h["val_prauc"] for h in metrics["history"]] == [0.5, 0.6, 0.7]  # rank 0's scores decided: 3 epochs
    assert metrics["best_epoch"] == 3
    digests = metrics["ddp"]["adapter_sha256_by_rank"]
    assert digests[0] == digests[1]  # rank 1 kept epoch 3's adapter too, not its own best (epoch 1)


def test_teacher_ddp_killed_after_an_epoch_resumes_to_the_uninterrupted_adapter(tmp_path):
    import time

    data = write_dataset(synth_dataset(patients=30, seed=5), tmp_path / "synth", source="synth")
    config = tmp_path / "tiny.toml"
    config.write_text("[teacher]\nmax_tokens = 300\nbatch_size = 4\ngrad_accum = 2\ntiming_patients = 1\npatience = 5\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cmd(run, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "leader_edge",
                "train", "--data", str(data), "--out", str(run), "--stage", "teacher", "--teacher", "tiny", "--epochs", "3",
                "--config", str(config), *extra]

    whole = subprocess.run(cmd(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=240)
    assert whole.returncode == 0, _why(whole)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = run / "teacher" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 200
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_tree(proc.pid)  # the launcher and every rank, right after the first checkpoint
    proc.wait(timeout=30)
    assert not (run / "teacher" / "metrics.json").exists()  # killed before the stage finished
    if state.is_file():  # (absent only if the kill fell inside a checkpoint swap: the resume then starts over)
        assert json.loads(state.read_text())["epoch"] < 3
    resumed = subprocess.run(cmd(run, "--resume"), env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, _why(resumed)
    digests = [json.loads((r / "teacher" / "metrics.json").read_text())["ddp"]["adapter_sha256_by_rank"] for r in (tmp_path / "whole", run)]
    assert digests[0] == digests[1]  # same adapter on both ranks as the uninterrupted run
