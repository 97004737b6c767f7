"""What the CLI prints when a command fails: one line for what the user can fix, the traceback
for a bug."""
import time

import pytest
from kafka.errors import KafkaTimeoutError

import workers.signing
from pipeline.errors import InputError
from workers.cli import main

BUG_LINE = "interneg: this is a bug; please report it with the traceback above"


def _stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_a_bad_option_gets_one_error_line(tmp_path, capsys):
    status = main(["produce", str(tmp_path), "--rate", "0"])
    assert status == 2
    assert _stderr_lines(capsys) == ["error: rate must be positive, got 0.0"]


def test_invalid_settings_get_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INTERNEG_MODEL__PRECISION", "fp64")
    status = main(["produce", str(tmp_path)])
    lines = _stderr_lines(capsys)
    assert status == 2 and len(lines) == 1
    # the variable the user set and the value it had, not pydantic's location tuple
    assert lines[0].startswith("error: invalid settings: INTERNEG_MODEL__PRECISION=fp64: Input should be")


def test_a_threshold_that_would_never_alert_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INTERNEG_METHOD__THRESHOLD", "-1")  # every score is above 0: no frame would ever alert
    status = main(["produce", str(tmp_path)])
    assert status == 2
    assert _stderr_lines(capsys) == ["error: invalid settings: INTERNEG_METHOD__THRESHOLD=-1: Input should be greater than 0"]


@pytest.mark.parametrize(
    "error, line",
    [
        (InputError("keys/: not a folder"), "error: keys/: not a folder"),
        (PermissionError("keys/: permission denied"), "error: keys/: permission denied"),
        (KafkaTimeoutError("Unable to bootstrap from [127.0.0.1:1]"), "error: Kafka: KafkaTimeoutError: Unable to bootstrap"),
    ],
)
def test_user_errors_get_one_line_and_status_2(error, line, tmp_path, capsys, monkeypatch):
    def fail(directory):
        raise error

    monkeypatch.setattr(workers.signing, "generate_keypair", fail)
    status = main(["keygen", str(tmp_path / "keys")])
    lines = _stderr_lines(capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(line)


@pytest.mark.parametrize("error", [IndexError("list index out of range"), ValueError("operands could not be broadcast together")])
def test_a_bug_keeps_its_traceback_and_says_so(error, tmp_path, capsys, monkeypatch):
    def fail(directory):
        raise error

    monkeypatch.setattr(workers.signing, "generate_keypair", fail)
    status = main(["keygen", str(tmp_path / "keys")])
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback (most recent call last)" in err and f"{type(error).__name__}: {error}" in err
    assert err.strip().splitlines()[-1] == BUG_LINE
    assert "error: " not in err


def test_an_empty_frames_folder_is_refused_before_any_connection(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INTERNEG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens: connecting would hang ~50 s
    (tmp_path / "notes.txt").write_text("not a frame")
    started = time.monotonic()
    status = main(["produce", str(tmp_path)])
    assert status == 2 and time.monotonic() - started < 10
    assert _stderr_lines(capsys) == [f"error: {tmp_path}: a folder with no image files in it (not recursive)"]
