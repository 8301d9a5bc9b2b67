"""A model file that would run code when loaded, for the tests of both scripts' --eval-only."""

import os
import sys

import pytest
import torch


class Payload:
    """What a shared model file could carry: unpickling it runs a command (here: touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_code_running_model_file_is_refused(script, model_format, tmp_path, capsys, monkeypatch):
    """A model.pt tagged as the script's own format whose pickle would run a command: --eval-only (the entry
    point, in process) refuses it with one error line and exit 2, nothing runs and nothing is written;
    loading it unsafely does run it."""
    marker, path = tmp_path / "payload_ran", tmp_path / "model.pt"
    torch.save({"format": model_format, "args": Payload(marker)}, path)
    monkeypatch.setattr(sys, "argv", [script.__file__, "--eval-only", "--checkpoint", str(path), "--runs-dir",
                                      str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exit_:
        script.run_command_line(script.main, script.Args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and "refused, nothing in it ran" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()
    torch.load(path, weights_only=False)  # the payload is real
    assert marker.exists()
