"""The teacher under torchrun: 2 CPU processes with gloo end with identical adapters."""

import json
import os
import subprocess
import sys

from leader_edge.data.dataset import write_dataset
from leader_edge.data.synth import synth_dataset


def _why(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines first (torchrun's summary alone names only a signal), then the tail."""
    lines = proc.stderr.splitlines()
    own = [ln for ln in lines if any(w in ln for w in ("Error", "terminate", "what():", "Traceback", "Abort"))]
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


RANK0_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from leader_edge.train.teacher import rank0_value
dist.init_process_group("gloo")
rank = dist.get_rank()
# each rank "sees" a different validation score; the decision must use rank 0's on both
value = rank0_value(0.5 + 0.001 * rank, torch.device("cpu"))
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:  # a file per rank: stdout lines of two processes interleave
    f.write(repr(value))
dist.destroy_process_group()
"""


def test_ranks_with_different_validation_scores_decide_on_rank0s(tmp_path):
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # a hang fails the test
    assert proc.returncode == 0, _why(proc)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0.5", "0.5"]


def test_teacher_ddp_killed_after_an_epoch_resumes_to_the_uninterrupted_adapter(tmp_path):
    import signal
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
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, right after the first checkpoint
    proc.wait(timeout=30)
    assert not (run / "teacher" / "metrics.json").exists()  # killed before the stage finished
    if state.is_file():  # (absent only if the kill fell inside a checkpoint swap: the resume then starts over)
        assert json.loads(state.read_text())["epoch"] < 3
    resumed = subprocess.run(cmd(run, "--resume"), env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, _why(resumed)
    digests = [json.loads((r / "teacher" / "metrics.json").read_text())["ddp"]["adapter_sha256_by_rank"] for r in (tmp_path / "whole", run)]
    assert digests[0] == digests[1]  # same adapter on both ranks as the uninterrupted run
