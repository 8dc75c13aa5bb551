"""A `vlm chat` / `vlm serve` server in a subprocess on a free loopback port, for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vlm_command() -> list[str]:
    """The installed `vlm` script beside this Python, else `python -m vlm.cli`."""
    script = Path(sys.executable).with_name("vlm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vlm.cli"]


class ServerProcess:
    """`vlm SUBCOMMAND --model DIR --port P EXTRA...`; waits until `ready` (a path) answers 200.

    `.url` ends with "/", `.pid`, `.log()` (everything the server printed), `.alive()`, `.stop()`.
    """

    def __init__(self, subcommand: str, model_dir: Path, log_path: Path, *extra: str, ready: str,
                 timeout: float = 180.0, headers: dict | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1",
               **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 -- open for the server's whole life
        self.proc = subprocess.Popen(
            [*vlm_command(), subcommand, "--model", str(model_dir), "--port", str(self.port), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"vlm {subcommand} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + ready, headers=headers or {}), timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"vlm {subcommand} did not answer within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        if not self._log.closed:  # `stop` closes it; the file stays readable
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def memory_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory (`VmRSS`) or its peak since `reset_peak` (`VmHWM`), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def reset_peak(self) -> None:
        """Start `VmHWM` afresh at the current resident memory (Linux: /proc/PID/clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


NOTICE = "⚠️ "  # how the chat page starts its own notes (not model output)


class ChatServer(ServerProcess):
    """`vlm chat` in a subprocess; `.url`, `.pid`, `.log()`."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, timeout: float = 180.0):
        super().__init__("chat", model_dir, log_path, *extra, ready="gradio_api/info", timeout=timeout)
