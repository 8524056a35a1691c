"""The loop's task contract (mmpref.training.task) and LoRA target defaults per modality."""

from types import SimpleNamespace

import pytest
import torch

from mmpref.training.config import ConfigError, LoraConfig, TrainConfig, load_config, validate
from mmpref.training.diffusion_task import DiffusionTask
from mmpref.training.task import Task
from mmpref.training.text_task import TextTask


@pytest.mark.parametrize(("cls", "modality", "unit"), [(TextTask, "text", "tokens"),
                                                       (DiffusionTask, "diffusion", "images")])  # fmt: skip
def test_tasks_implement_the_contract(cls, modality, unit):
    assert issubclass(cls, Task) and not cls.__abstractmethods__
    assert (cls.modality, cls.unit) == (modality, unit)


def test_optional_hooks_default_to_nothing():
    class Minimal(Task):
        modality, unit = "text", "rows"

        def prepare_splits(self):
            raise NotImplementedError

        load_models = prepare_splits

        def build_artifacts(self, models, splits):
            raise NotImplementedError

        make_reference = build_artifacts

        def wrap_for_training(self, models):
            raise NotImplementedError

        def collate_train(self, indices):
            return {}

        collate_eval = collate_train

        def rows(self, model, batch):
            raise NotImplementedError

        def count_units(self, batch):
            return 0

        def save(self, model, out_dir, state_dict=None):
            pass

    run_plan = SimpleNamespace(cfg=TrainConfig(model="m", dataset="d"), source=None)
    task, model = Minimal(run_plan, None), torch.nn.Linear(1, 1)
    assert task.plan is run_plan and task.cfg is run_plan.cfg  # the constructor only stores the plan
    assert task.sample_and_score(model, 3) == {} and task.checkpoint_objects() == []
    assert task.after_optimizer_step(model) is None and task.finalize(model) is None
    assert task.flush() is None and task.data_metrics() == {}
    assert task.is_sdxl is False
    with pytest.raises(TypeError, match="abstract"):

        class Incomplete(Task):
            modality, unit = "text", "rows"

        Incomplete(run_plan, None)


def lora(*overrides):
    return load_config(None, ["model=m", "dataset=d", "lora.r=4", *overrides]).lora


def test_lora_targets_default_per_modality_and_explicit_lists_are_kept():
    assert lora().target_modules is None
    assert lora().targets("text") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora().targets("diffusion") == ["to_q", "to_k", "to_v", "to_out.0"]
    given = lora("lora.target_modules=q_proj,v_proj")
    assert given.targets("text") == given.targets("diffusion") == ["q_proj", "v_proj"]  # used as given
    with pytest.raises(ConfigError, match="lora.target_modules"):
        validate(TrainConfig(model="m", dataset="d", lora=LoraConfig(target_modules=[])))

