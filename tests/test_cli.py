"""The `slm` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import re
import signal
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


def test_a_llama_style_checkpoint_exports_as_llama(tmp_path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    from model import GPT
    from model.checkpoint import save_checkpoint
    from model.config import preset

    config = preset("tiny", position="rotary", norm="rmsnorm", activation="swiglu", bias=False)
    save_checkpoint(tmp_path / "run", GPT(config), step=0)
    hf = slm("export-hf", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")).__name__ == (
        "LlamaForCausalLM"
    )
    exported = slm("export-gguf", str(tmp_path / "run"), str(tmp_path / "m.gguf"))
    assert exported.returncode == 0, exported.stderr
    architecture = gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"]
    assert architecture.contents() == "llama"


def test_train_writes_a_checkpoint_that_generate_loads(train_data, tmp_path) -> None:
    run = str(tmp_path / "run")
    options = ("--max-steps", "3", "--batch-size", "2", "--block-size", "16", "--eval-iters", "1")
    options += ("--log-interval", "1")
    trained = slm("train", "--data", str(train_data), "--out", run, *options)
    assert trained.returncode == 0, trained.stderr
    assert "finished at step 3/3" in trained.stdout
    assert "eval step 3: train loss" in trained.stderr and "tokens/s" in trained.stderr
    story = slm("generate", "--checkpoint", run, "--max-new-tokens", "5", "--seed", "1")
    assert story.returncode == 0, story.stderr
    assert "[step-00000003, step 3, on cpu]" in story.stderr
    resumed = slm("train", "--resume", run, "--quiet")  # already finished: nothing left to do
    assert resumed.returncode == 0, resumed.stderr
    assert "finished at step 3/3" in resumed.stdout
    longer = slm("train", "--resume", run, "--max-steps", "5", "--quiet")
    assert longer.returncode == 0, longer.stderr
    assert "finished at step 5/5" in longer.stdout
    other = slm("train", "--resume", run, "--max-steps", "6", "--lr", "0.1")
    assert other.returncode == 2
    assert "takes no other options than --max-steps, --max-tokens or --max-minutes" in other.stderr


def test_bad_train_options_are_a_clear_error(train_data, tmp_path) -> None:
    common = ("train", "--data", str(train_data), "--out", str(tmp_path / "run"))
    inverted = slm(*common, "--lr", "0.1", "--min-lr", "1")
    assert inverted.returncode == 2
    assert "min_lr (1.0) must not exceed lr (0.1)" in inverted.stderr
    empty = slm(*common, "--batch-size", "0")
    assert empty.returncode == 2
    assert "batch_size: Input should be greater than or equal to 1" in empty.stderr
    for result in (inverted, empty):
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_story_ends_its_line(tmp_path) -> None:
    slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    story = slm("generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "4")
    assert story.returncode == 0, story.stderr
    assert story.stdout.endswith("\n") and not story.stdout.endswith("\n\n")


def test_a_missing_extra_is_named_in_one_line(tmp_path) -> None:
    # A `gguf` that cannot be imported, as in a venv made without the export extra.
    (tmp_path / "absent" / "gguf").mkdir(parents=True)
    (tmp_path / "absent" / "gguf" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gguf'\", name='gguf')\n"
    )
    slm("init", "--preset", "tiny", "--out", str(tmp_path / "run"))
    env = {"PYTHONPATH": str(tmp_path / "absent")}
    exported = slm("export-gguf", str(tmp_path / "run"), str(tmp_path / "m.gguf"), env=env)
    assert exported.returncode == 1
    assert "Traceback" not in exported.stderr
    assert exported.stderr.strip().splitlines() == [
        "slm export-gguf: needs gguf, from the 'export' extra: pip install -c constraints/cpu.txt"
        ' -e ".[export]" in a checkout, else pip install "slm[export]"'
    ]
    assert not (tmp_path / "m.gguf").exists()


def test_ctrl_c_saves_a_checkpoint_says_where_and_exits_0(train_data, tmp_path) -> None:
    run = tmp_path / "run"
    options = ("--max-steps", "100000", "--batch-size", "2", "--block-size", "16")
    options += ("--log-interval", "1", "--eval-iters", "1", "--checkpoint-interval", "0")
    process = subprocess.Popen(
        [SLM, "train", "--data", str(train_data), "--out", str(run), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stderr:  # the first step's log line: training is under way
            if line.startswith("step 1/"):
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert "a checkpoint is saved after this step (Ctrl-C again aborts)" in stderr
    stopped = re.search(r"stopped at step (\d+)/100000 .* checkpoint (\S+)", stdout)
    assert stopped is not None, stdout
    checkpoint = Path(stopped[2])
    assert checkpoint == run / f"step-{int(stopped[1]):08d}.json" and checkpoint.is_file()
    assert f"continue with: slm train --resume {run}" in stdout
    assert "Traceback" not in stderr


def test_the_embedded_redis_data_is_not_committed() -> None:
    root = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(
        ["git", "check-ignore", "--quiet", ".slm/redis/dump.rdb"], cwd=root, check=False
    )
    assert ignored.returncode == 0
