"""The loop's task contract (mmpref.training.task), LoRA target defaults per modality, the loss's sides."""

import pytest
import torch

from mmpref.training.config import ConfigError, LoraConfig, TrainConfig, load_config, validate
from mmpref.training.diffusion_task import DiffusionTask
from mmpref.training.objective import Rows, Side, _split
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

        def collate_train(self, indices):
            return {}

        collate_eval = collate_train

        def rows(self, model, batch):
            raise NotImplementedError

        def count_units(self, batch):
            return 0

        def save(self, model, out_dir, state_dict=None):
            pass

    task, model = Minimal(), torch.nn.Linear(1, 1)
    assert task.sample_and_score(model, 3) == {} and task.checkpoint_objects() == []
    assert task.after_optimizer_step(model) is None and task.finalize(model) is None
    assert task.is_sdxl is False
    with pytest.raises(TypeError):

        class Incomplete(Task):
            modality, unit = "text", "rows"

        Incomplete()


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


def test_split_names_the_sides():
    paired = Rows(logratios=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), row_index=torch.arange(2),
                  lengths=torch.tensor([[5.0, 6.0], [7.0, 8.0]]), scores=torch.tensor([[0.9, 0.1], [0.8, 0.2]]))  # fmt: skip
    chosen, rejected = _split(paired)
    assert isinstance(chosen, Side)
    assert chosen.logratios.tolist() == [1.0, 3.0] and rejected.lengths.tolist() == [6.0, 8.0]
    assert rejected.scores.tolist() == pytest.approx([0.1, 0.2]) and chosen.policy_logps is None
    unpaired = Rows(logratios=torch.tensor([[1.0], [2.0], [3.0]]), row_index=torch.arange(3),
                    labels=torch.tensor([True, False, True]), embeddings=torch.eye(3))  # fmt: skip
    good, bad = _split(unpaired)
    assert good.logratios.tolist() == [1.0, 3.0] and bad.logratios.tolist() == [2.0]
    assert bad.embeddings.tolist() == [[0.0, 1.0, 0.0]] and good.scores is None
