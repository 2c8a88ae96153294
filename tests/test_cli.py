"""The `slm` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SLM = str(Path(sys.executable).with_name("slm"))


def slm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SLM, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_init_then_generate_streams_a_reproducible_story(tmp_path) -> None:
    created = slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert created.returncode == 0, created.stderr
    assert "3,320,640 parameters" in created.stdout
    args = ("generate", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--seed", "5")
    first = slm(*args, env={"CHECKPOINT_DIR": str(tmp_path)})
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon a time")
    assert len(first.stdout) > len("Once upon a time")
    assert "[length; 12 tokens; first after" in first.stderr and "tok/s]" in first.stderr
    again = slm(*args, "--checkpoint", str(tmp_path / "run"))
    assert again.stdout == first.stdout


def test_info_prints_the_metadata(tmp_path) -> None:
    slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"), "--seed", "3")
    shown = slm("info", str(tmp_path / "run"))
    meta = json.loads(shown.stdout)
    assert meta["step"] == 0 and meta["config"]["n_layer"] == 2
    assert meta["extra"] == {"preset": "tiny", "init_seed": 3}


def test_no_checkpoint_is_a_clear_error_not_a_traceback(tmp_path) -> None:
    result = slm("generate", env={"CHECKPOINT_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert f"no checkpoint under {tmp_path}" in result.stderr and "slm init" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_sampling_options_are_a_clear_error(tmp_path) -> None:
    slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    result = slm("generate", "--checkpoint", str(tmp_path / "run"), "--top-p", "1.5")
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr and "Traceback" not in result.stderr


def test_exports_from_the_command_line_load_in_their_tools(tmp_path) -> None:
    import gguf
    from transformers import GPT2LMHeadModel

    slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    hf = slm("export-hf", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.n_layer == 2
    exported = slm("export-gguf", str(tmp_path / "run"), str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert exported.returncode == 0, exported.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    architecture = reader.fields["general.architecture"]
    assert bytes(architecture.parts[architecture.data[0]]).decode() == "gpt2"
