"""The README's "Your own model, step by step", word for word: its files written as shown,
its commands run as shown, in an empty folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, mpi_env

BLOCK = re.compile(r"<!-- walkthrough: (?P<what>\S+) -->\n```[a-z]*\n(?P<text>.*?)```", re.S)


def walkthrough() -> tuple[dict[str, str], list[str]]:
    """The section's files (path -> text) and its command lines, in order."""
    files, commands = {}, []
    for block in BLOCK.finditer((REPO / "README.md").read_text()):
        if block["what"] == "run":
            commands += [line for line in block["text"].splitlines() if line.strip()]
        else:
            files[block["what"]] = block["text"]
    return files, commands


@pytest.mark.mpi
def test_your_own_model_step_by_step(tmp_path):
    files, commands = walkthrough()
    assert set(files) == {"mymodel/export.py", "mymodel/job.toml"} and len(commands) == 4
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    # The commands as a user types them: python, spmdinfer and mpiexec from PATH (this
    # interpreter's folder first, where the `spmdinfer` script is installed).
    env = mpi_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                  GLOG_v="3")
    outputs = []
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert f"output: {tmp_path / 'mymodel/out/scores.h5'} will be written" in outputs[1]
    assert "spmdinfer: 1000 rows, 8 batches" in outputs[2]
    assert outputs[3].strip() == "(1000, 8) True"
