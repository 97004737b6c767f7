"""Worker processes started from Python: the local end-to-end run and the integration tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel, SecretStr

from schemas.settings import Settings


def settings_env(settings: Settings, prefix: str = "INTERNEG_") -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}

    def walk(model: BaseModel, path: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{path}{name.upper()}"
            if isinstance(value, BaseModel):
                walk(value, key + "__")
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()  # the child needs the secret itself, not its mask
            elif value is None:  # explicitly: unset would mean the default, or whatever the parent's environment says
                env[key] = "null"
            elif isinstance(value, (list, tuple, dict)):
                env[key] = json.dumps(value)  # pydantic-settings reads complex values as JSON
            else:
                env[key] = str(value) if not isinstance(value, bool) else ("true" if value else "false")

    walk(settings, prefix)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """``interneg score-worker`` or ``invert-worker`` as a child process with its HTTP port known."""

    def __init__(self, command: str, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None):
        self.command = command
        self.port = free_port()
        settings = settings.model_copy(deep=True)
        settings.worker.http_port = self.port
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", command], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.process.returncode}; log: {self.log_tail()}")
            try:
                if self._get("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.command} not ready within {timeout_s} s; log: {self.log_tail()}")

    def status(self) -> dict:
        return self._get("/status")[1]

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM: the worker finishes its batch, commits and leaves its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no draining, no commit; the group must redeliver its batch."""
        self.process.kill()
        self.process.wait()
        self._log.close()
