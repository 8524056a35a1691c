"""The docs name only keys that exist: every mmpref key in the TRL mapping is a real config key."""

import dataclasses
import re
from pathlib import Path

from mmpref.training.config import LoraConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def config_keys() -> set[str]:
    keys = set()

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            keys.add(prefix + f.name)
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                walk(f.default_factory, f"{prefix}{f.name}.")

    walk(TrainConfig)
    walk(LoraConfig, "lora.")
    return keys


def test_trl_mapping_names_real_keys():
    keys = config_keys()
    table = [line for line in (ROOT / "docs" / "trl.md").read_text().splitlines() if line.startswith("| `")]
    assert len(table) > 20
    named = set()
    for line in table:
        mmpref_column = line.split(" | ")[1]
        # a key is written `key` or `key: value`; plain values (`fp16`, `hinge`) have no `_`, `.` or `:`
        for name, value in re.findall(r"`([a-z0-9_.]+)(:[^`]*)?`", mmpref_column):
            if value or "_" in name or "." in name:
                named.add(name)
    for section in ("lora",):  # `lora: {r, alpha, ...}` names the section
        named.discard(section)
    unknown = sorted(n for n in named if n not in keys)
    assert not unknown, unknown
    assert {"loss.beta", "num_epochs", "eval_split", "loss.sft_weight", "push_to_hub"} <= named
