"""Starts real `llama-server` processes for the SDK tests.

Each server serves the demo model (a random-weight tiny Llama generated from the real Llama 3
tokenizer), listens on a free loopback port, and reads its keys from files like a mounted
Secret. Environment: LLAMA_SERVER_BIN (the binary; default target/debug/llama-server) and
LLAMA_TOKENIZER_DIR (printed by scripts/setup-tokenizer.sh).
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "Meta-Llama-3.1-8B-Instruct"


def _binary() -> str:
    path = os.environ.get("LLAMA_SERVER_BIN", str(ROOT / "target" / "debug" / "llama-server"))
    if not Path(path).exists():
        raise RuntimeError(f"{path} does not exist: run `cargo build -p llama-server` first")
    return path


def _tokenizer_dir() -> str:
    path = os.environ.get("LLAMA_TOKENIZER_DIR")
    if not path:
        raise RuntimeError("LLAMA_TOKENIZER_DIR is not set: run scripts/setup-tokenizer.sh")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running llama-server with its keys and log."""

    def __init__(self, workdir: Path, config: dict, drain_seconds: int = 30):
        self.workdir = workdir
        self.keys_dir = workdir / "keys"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        self.primary = secrets.token_hex(16)
        self.secondary = secrets.token_hex(16)
        (self.keys_dir / "primaryKey").write_text(self.primary)
        (self.keys_dir / "secondaryKey").write_text(self.secondary)
        base = {
            "modelName": MODEL_NAME,
            "modelPath": "demo",
            "tokenizerDir": _tokenizer_dir(),
            "auth": {"mode": "key", "keysDir": str(self.keys_dir)},
        }
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        self.config_path = workdir / "server.yaml"
        self.config_path.write_text(json.dumps(base))  # JSON is YAML
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [_binary(), "serve", "--config", str(self.config_path),
             "--listen", f"127.0.0.1:{self.port}", "--drain-seconds", str(drain_seconds)],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(workdir.parent)},
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.endpoint}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llama-server not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def metric(self, sample: str) -> float:
        """The value of one sample of GET /metrics (name with labels), 0 when absent."""
        for line in httpx.get(f"{self.endpoint}/metrics", timeout=10).text.splitlines():
            if line.startswith(sample + " "):
                return float(line[len(sample) + 1:])
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    started = []

    def start(config: dict | None = None, drain_seconds: int = 30, ready: bool = True) -> Server:
        server = Server(tmp_path_factory.mktemp("server"), config or {}, drain_seconds)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> Server:
    """The shared server: default limits, content safety on with one extra phrase."""
    return server_factory({"contentSafety": {"enabled": True, "blocklist": ["forbidden fruit"]}})
