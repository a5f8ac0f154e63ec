"""The demo, shortened (a small corpus, a few steps), and the README's commands."""

from __future__ import annotations

import re
import shlex

import pytest

from flame.config.errors import ConfigError
from flame.config.loader import parse_args
from flame.config.validate import validate
from tests.helpers import ROOT, read_metrics, run


@pytest.mark.slow  # CI's slow tier: corpus, tokenizer, 2-rank training, export and generation, ~50 s
def test_demo_end_to_end_shortened(tmp_path):
    data, dump = tmp_path / "demo_data", tmp_path / "demo_run"
    proc = run(
        [
            "bash", "scripts/demo.sh",
            "--model.tokenizer_path", str(data / "tokenizer"),
            "--training.data_files", str(data / "train.jsonl"),
            "--validation.data_files", str(data / "validation.jsonl"), "--validation.freq", "4",
            "--job.dump_folder", str(dump),
            "--training.steps", "8", "--training.seq_len", "64", "--metrics.log_freq", "2",
            "--checkpoint.interval", "4", "--lr_scheduler.warmup_steps", "2",
        ],
        DEMO_DATA_ARGS=f"--out {data} --max-files 40 --vocab-size 512",
    )  # fmt: skip
    records = read_metrics(dump)
    assert records[-1]["step"] == 8 and records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "validation_loss" in r] == [4, 8]
    for name in (
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "config.toml",
        "summary.json", "metrics.png",
    ):  # fmt: skip
        assert (dump / name).exists(), name
    assert "--- 'def '" in proc.stdout and "demo finished" in proc.stdout


def readme_commands() -> list[str]:
    """Every `train.sh` command in the README's bash blocks (line continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "train.sh" in line and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def test_readme_train_commands_are_valid_configs():
    """Each README example parses and validates for its NGPU x NNODE; only the files that `make demo`
    creates (data/, outputs/) may be missing on a fresh clone."""
    commands = readme_commands()
    assert len(commands) >= 8
    assert any("--job.config_file flame/models/fla.toml" in c for c in commands)  # the upstream README's command
    for command in commands:
        words = shlex.split(command, comments=True)
        env = dict(w.split("=", 1) for w in words[: words.index("bash")] if "=" in w)
        argv = words[words.index("train.sh") + 1 :]
        if argv in (["-h"], ["--help"]):
            continue
        config = parse_args(argv)
        world = int(env.get("NGPU", 1)) * int(env.get("NNODE", 1))
        try:
            validate(config, world)
        except ConfigError as e:
            missing = r"'(data|outputs)/[^']*'( does not exist|.*: no such file)"
            real = [p for p in e.problems if not re.search(missing, p)]
            assert not real, f"README command {command!r}: {real}"
