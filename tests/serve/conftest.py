"""A real `leader-edge serve` on a free loopback port, started as its own process, and fake bundles.

The bundles are the hand-built ONNX graph of tests/test_runtime.py (probability = sigmoid(w * known
diagnoses + b)), written by the export's own `write_bundle`, so each proves itself at load."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bedside"))  # the fake bundle of test_runtime

from test_runtime import HEADER, write_fake_bundle  # noqa: E402

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`leader-edge serve` in a child process; `client` talks HTTP to it."""

    def __init__(self, bundle: Path, *, token: str | None = TOKEN, args: tuple = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LEADER_EDGE_SERVE_TOKEN": token or ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "leader_edge", "serve", "--bundle", str(bundle),
                                      "--port", str(self.port), *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("serve did not answer /healthz within 60 s")
            time.sleep(0.1)

    def stop(self) -> str:
        """SIGTERM, wait, and the process's output."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("bundle-a"))


@pytest.fixture(scope="session")
def other_bundle_dir(tmp_path_factory) -> Path:
    """Another bundle: the model reads 1 diagnosis per visit, so its probabilities differ."""
    return write_fake_bundle(tmp_path_factory.mktemp("bundle-b"), max_codes=1)


@pytest.fixture(scope="module")
def server(bundle_dir):
    s = Server(bundle_dir, args=("--max-batch", "8", "--max-body-bytes", "65536"))
    yield s
    s.stop()


__all__ = ["HEADER", "Server", "TOKEN"]
