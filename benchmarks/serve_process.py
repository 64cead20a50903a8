"""`towerline serve` in a process of its own, as a deployment runs it: for the benchmarks that load
it, kill it or watch its memory."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from towerline.config import ServeConfig, TowerlineConfig, dump_config
from towerline.errors import TowerlineError


class ServeProcess:
    """`with ServeProcess(config, index, onnx, serve) as server:` — started, SERVING, on `server.address`;
    stopped with SIGTERM on exit (SIGKILL if it does not stop). `port`: a fixed port, for a restart
    on the same address."""

    def __init__(self, config: TowerlineConfig, index_path: Path, onnx_path: Path, serve: ServeConfig,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._config = config.model_copy(update={"serve": serve.model_copy(update={"host": "127.0.0.1",
                                                                                     "port": self.port})})
        self._command = [sys.executable, "-m", "towerline", "serve", "--index", str(index_path),
                         "--onnx", str(onnx_path)]
        self._scratch = tempfile.TemporaryDirectory(prefix="towerline-serve-")
        self.log_file = Path(self._scratch.name) / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def start(self, timeout_s: float = 300) -> ServeProcess:
        from serving.client import RetrievalClient

        config_file = Path(self._scratch.name) / "serve.yaml"
        dump_config(self._config, config_file)
        with self.log_file.open("a") as log:
            self.process = subprocess.Popen([*self._command, "-c", str(config_file)], stdout=log,
                                            stderr=subprocess.STDOUT)
        with RetrievalClient(self.address, timeout_s=5) as client:  # health needs no token
            self._wait_serving(client, timeout_s)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._scratch.cleanup()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the replica vanishes as a lost machine would, with calls in flight."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise TowerlineError(f"no VmRSS for pid {self.process.pid}")

    def _wait_serving(self, client: Any, timeout_s: float) -> None:
        """The client's own readiness wait, a second at a time, so that a server that exits is seen at once."""
        from serving.errors import RetrievalRpcError

        assert self.process is not None
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise TowerlineError(f"towerline serve exited ({self.process.returncode}):\n"
                                     f"{self.log_file.read_text()[-2000:]}")
            try:
                client.wait_ready(timeout=1.0)
                return
            except RetrievalRpcError:
                pass  # not listening or not SERVING yet
        raise TowerlineError(f"towerline serve did not come up in {timeout_s:g} s:\n"
                             f"{self.log_file.read_text()[-2000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
