"""The upstream flame README's training command: its files exist here and it passes a dry run.

``flame/models/fla.toml`` and the upstream config names (``configs/transformer_340M.json`` ...) are
shipped for it; the names are symbolic links to the zoo's configs (``configs/models/``).
"""

from __future__ import annotations

import json
import shlex

from tests.helpers import ROOT, run
from tests.launch.conftest import train_sh
from tests.test_demo import readme_commands

# upstream name -> the zoo config it stands for (upstream's transformer_* are Llama-style decoders)
ALIASES = {
    "transformer_340M": "llama_340m",
    "transformer_1B": "llama_1b",
    "transformer_7B": "llama_7b",
    "gla_340M": "gla_340m",
    "delta_net_340M": "delta_net_340m",
    "delta_net_1B": "delta_net_1b",
    "gated_deltanet_340M": "gated_deltanet_340m",
    "gated_deltanet_1B": "gated_deltanet_1b",
    "gsa_340M": "gsa_340m",
    "gsa_1B": "gsa_1b",
    "hgrn2_340M": "hgrn2_340m",
    "mamba_340M": "mamba_340m",
    "mamba_1B": "mamba_1b",
    "mamba2_340M": "mamba2_340m",
    "mamba2_1B": "mamba2_1b",
    "samba_1B": "samba_1b",
}

# The command of the upstream README (Training section), word for word.
UPSTREAM = """bash train.sh \
  --job.config_file flame/models/fla.toml \
  --job.dump_folder exp/transformer-340M-4K-10B/batch1.seqlen65536.context4096.warmup1024.update1.steps20480.lr1e-3.cosine \
  --model.config configs/transformer_340M.json \
  --model.tokenizer_path fla-hub/transformer-1.3B-100B \
  --optimizer.name AdamW \
  --optimizer.eps 1e-15 \
  --optimizer.lr 1e-3 \
  --lr_scheduler.warmup_steps 1024 \
  --lr_scheduler.lr_min 0.1 \
  --lr_scheduler.decay_type cosine \
  --training.batch_size 1 \
  --training.seq_len 65536 \
  --training.context_len 4096 \
  --training.varlen \
  --training.gradient_accumulation_steps 1 \
  --training.steps 20480 \
  --training.max_norm 1.0 \
  --training.skip_nan_inf \
  --training.dataset HuggingFaceFW/fineweb-edu \
  --training.dataset_name sample-100BT \
  --training.dataset_split train \
  --training.num_workers 32 \
  --training.prefetch_factor 2 \
  --training.seed 42 \
  --training.compile \
  --checkpoint.interval 2048 \
  --checkpoint.load_step -1 \
  --checkpoint.keep_latest_k 2 \
  --metrics.log_freq 1"""


def test_every_upstream_config_name_is_a_link_to_its_zoo_config():
    configs = ROOT / "configs"
    shipped = {p.stem for p in configs.glob("*.json")} - {"llama_demo"}
    assert shipped == set(ALIASES), "every alias in configs/ is listed here, and every listed one exists"
    for alias, zoo in ALIASES.items():
        path, target = configs / f"{alias}.json", configs / "models" / f"{zoo}.json"
        assert path.is_symlink(), f"{path.name} must be a link to models/{zoo}.json, not a copy that can drift"
        assert path.resolve() == target.resolve(), (alias, path.resolve())
        assert json.loads(path.read_text()) == json.loads(target.read_text())
        family = alias.rsplit("_", 1)[0]
        assert json.loads(target.read_text())["model_type"] == ("llama" if family == "transformer" else family)


def test_the_readme_carries_the_upstream_command_verbatim():
    words = shlex.split(UPSTREAM)
    assert words in [shlex.split(c) for c in readme_commands()]


def test_upstream_command_passes_a_dry_run_with_a_local_tokenizer(byte_tokenizer):
    """Verbatim, with the hub tokenizer replaced by a local one (no network here): validation and the whole
    plan pass, and nothing is written (no exp/ folder)."""
    argv = shlex.split(UPSTREAM)[2:]
    proc = run([*train_sh(argv), "--model.tokenizer_path", byte_tokenizer, "--job.dry_run"])
    assert "dry run for 1 ranks" in proc.stdout, proc.stdout
    assert "global batch 65,536 tokens" in proc.stdout
    assert "layers per pipeline stage [21]" in proc.stdout  # the zoo's llama_340m behind the upstream name
    assert not (ROOT / "exp" / "transformer-340M-4K-10B").exists()
