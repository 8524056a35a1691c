import os
import tempfile

import pytest
import torch

# A stray hub call must fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# remembered file hashes (mmpref.hub.file_sha256) in a folder of this run's, not the user's ~/.cache/mmpref
os.environ.setdefault("MMPREF_CACHE", tempfile.mkdtemp(prefix="mmpref-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is far faster than two contended ones.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_weights(monkeypatch) -> None:
    """Any model weights loaded through transformers (its Auto classes included) or diffusers fail the test: for
    tests that a mistake is reported before anything heavy loads."""
    import diffusers
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the problem was reported")

    for cls in (transformers.PreTrainedModel, _BaseAutoModelClass, diffusers.ModelMixin):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """wandb's real package in offline mode, every folder of it under tmp_path; returns its run root."""
    root = tmp_path / "wandb_home"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": root, "WANDB_DATA_DIR": root / "data",
           "WANDB_CACHE_DIR": root / "cache", "WANDB_CONFIG_DIR": root / "config", "WANDB_SILENT": "true",
           "WANDB_CONSOLE": "off"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    root.mkdir()
    import wandb

    wandb.teardown()  # settings are read once per setup: drop any left from another test
    yield root / "wandb"
    wandb.teardown()
