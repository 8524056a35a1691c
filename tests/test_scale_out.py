"""Scale-out: the shipped Accelerate configs, the sharded-mode checks, and 2-process DDP = 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from mmpref.data.image_task import make_image_style_task
from mmpref.tiny_models import make_tiny_lm, make_tiny_sd15
from mmpref.training import ConfigError, load_config, train
from mmpref.training.plan import check_scale_out, plan

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def launch_env(config_name: str):
    """What `accelerate launch --config_file configs/accelerate/<name>` resolves, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / config_name), "-m", "mmpref.cli", "train", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize(
    "name, kind, processes, machines",
    [
        ("multi_gpu.yaml", DistributedType.MULTI_GPU, 8, 1),
        ("multi_node.yaml", DistributedType.MULTI_GPU, 16, 2),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED, 8, 1),
        ("deepspeed_zero3.yaml", DistributedType.DEEPSPEED, 8, 1),
        ("fsdp.yaml", DistributedType.FSDP, 8, 1),
        ("cpu_gloo_2proc.yaml", DistributedType.MULTI_GPU, 2, 1),
    ],
)
def test_accelerate_configs_resolve_as_intended(name, kind, processes, machines):
    args, defaults = launch_env(name)
    assert defaults.distributed_type == kind
    assert (args.num_processes, args.num_machines) == (processes, machines)
    if kind == DistributedType.DEEPSPEED:
        from accelerate.utils.launch import prepare_deepspeed_cmd_env

        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-6]  # zero2 / zero3
        assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
        if name == "deepspeed_zero3.yaml":  # the settings mmpref's checks require
            assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
            assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    if kind == DistributedType.FSDP:
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)
        assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def fake_accelerator(kind: DistributedType, zero_stage: int = 0, zero3_init: bool = False):
    plugin = SimpleNamespace(zero_stage=zero_stage, zero3_init_flag=zero3_init)
    return SimpleNamespace(state=SimpleNamespace(distributed_type=kind, deepspeed_plugin=plugin))


def test_sharded_modes_refuse_what_they_cannot_run_and_name_the_fix(tmp_path):
    zero3 = fake_accelerator(DistributedType.DEEPSPEED, 3)
    zero3.num_processes = 2
    model = tmp_path / "lm"  # only its config.json is read: the plan loads no weights
    model.mkdir()
    (model / "config.json").write_text("{}")
    frozen = load_config(None, [f"model={model}", f"dataset={tmp_path / 'x.jsonl'}", "precompute_ref=false"])
    with pytest.raises(ConfigError, match="frozen reference copy.*precompute_ref: true.*lora"):
        plan(frozen, zero3)
    with pytest.raises(ConfigError, match="dataset: no such file"):  # precompute_ref (default) passes
        plan(load_config(None, [f"model={model}", f"dataset={tmp_path / 'x.jsonl'}"]), zero3)
    with pytest.raises(ConfigError, match="frozen reference copy.*use lora"):  # diffusion: LoRA only
        check_scale_out(frozen, zero3, frozen_reference=True, text=False)
    check_scale_out(frozen, fake_accelerator(DistributedType.DEEPSPEED, 2), frozen_reference=True, text=True)
    check_scale_out(frozen, fake_accelerator(DistributedType.FSDP), frozen_reference=True, text=True)
    with pytest.raises(ConfigError, match="zero3_init_flag: set it to false"):
        check_scale_out(frozen, fake_accelerator(DistributedType.DEEPSPEED, 3, True), frozen_reference=False, text=True)
    accum = load_config(None, ["model=m", "dataset=x.jsonl", "gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: must be 1 under DeepSpeed"):
        check_scale_out(accum, fake_accelerator(DistributedType.DEEPSPEED, 2), frozen_reference=False, text=True)
    check_scale_out(accum, fake_accelerator(DistributedType.MULTI_GPU), frozen_reference=True, text=True)
    merge = load_config(None, ["model=m", "dataset=x.jsonl", "lora.r=4", "lora.merge=true"])
    with pytest.raises(ConfigError, match="lora.merge: merging needs the whole model"):
        check_scale_out(merge, fake_accelerator(DistributedType.FSDP), frozen_reference=False, text=True)


# ------------------------------------------------------------------------ 2 processes = 1 process


def launch_two_processes(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(CONFIGS / "cpu_gloo_2proc.yaml"), "-m", "mmpref.cli", "train"]  # fmt: skip
    subprocess.run([*launch, *args], check=True, env=env, timeout=600)


def logged(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train metrics by step, eval metrics by step)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}, {m["step"]: m for m in lines if "eval/loss" in m}


def assert_same_run(ddp: Path, single: Path, steps: int, later_rel: float = 1e-4) -> None:
    """Step 1's loss and gradient norm to float noise; later steps (which also check that earlier gradients
    were the global ones) to ``later_rel``: Adam's first steps (≈ lr·sign(g)) amplify summation-order
    differences of the near-zero gradient components."""
    ddp_train, ddp_eval = logged(ddp)
    single_train, single_eval = logged(single)
    for step in range(1, steps + 1):
        rel = 1e-4 if step == 1 else later_rel
        assert ddp_train[step]["loss"] == pytest.approx(single_train[step]["loss"], rel=rel, abs=1e-6), step
        assert ddp_train[step]["grad_norm"] == pytest.approx(single_train[step]["grad_norm"], rel=rel), step
    for key in ("eval/loss", "eval/rewards/margins"):
        # before training: the eval set split over processes gives the same figures
        assert ddp_eval[0][key] == pytest.approx(single_eval[0][key], rel=1e-5, abs=1e-6)
        # after it: Adam's first steps (≈ lr·sign(g)) amplify summation-order differences of tiny gradients
        assert ddp_eval[steps][key] == pytest.approx(single_eval[steps][key], rel=2e-3, abs=1e-5)


def test_save_writes_the_gathered_state_dict_when_given(tmp_path):
    """Under FSDP / ZeRO-3 the loop passes the gathered weights; the saved model must be those."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpref.training.diffusion_task import DiffusionTask
    from mmpref.training.text_task import TextTask

    lm_dir = make_tiny_lm(tmp_path / "lm", seed=0)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    gathered = {k: v + 1.0 for k, v in lm.state_dict().items()}
    text_self = SimpleNamespace(cfg=SimpleNamespace(lora=None), tokenizer=AutoTokenizer.from_pretrained(lm_dir))
    TextTask.save(text_self, lm, tmp_path / "text", state_dict=gathered)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "text").state_dict()
    torch.testing.assert_close(saved["model.norm.weight"], gathered["model.norm.weight"])

    from diffusers import UNet2DConditionModel

    sd15 = make_tiny_sd15(tmp_path / "sd15", seed=0)
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    gathered = {k: v + 1.0 for k, v in unet.state_dict().items()}
    from mmpref.hub import resolve_model

    diffusion_self = SimpleNamespace(cfg=SimpleNamespace(lora=None, model=str(sd15)), is_sdxl=False,
                                     source=resolve_model("model", str(sd15), markers=("model_index.json",)))  # fmt: skip
    DiffusionTask.save(diffusion_self, unet, tmp_path / "unet", state_dict=gathered)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "unet" / "unet").state_dict()
    torch.testing.assert_close(saved["conv_in.weight"], gathered["conv_in.weight"])


def test_two_process_text_dpo_matches_one_process(tmp_path, capsys):
    """`accelerate launch --config_file configs/accelerate/cpu_gloo_2proc.yaml`: plain DPO, per-process batches."""
    model = make_tiny_lm(tmp_path / "lm", seed=0)
    rows = [{"prompt": f"Question {i}: name a {w} thing.", "chosen": f"A {w} {i} is good.", "rejected": f"No {i}."}
            for i, w in enumerate(["red", "blue", "green", "small", "loud", "warm"] * 4)]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={model}", f"dataset={data}", "eval_split=0.34", "eval_batch_size=4", "max_steps=2",
              "log_every=1", "report_to=none", "learning_rate=1e-3", "max_length=48", "max_prompt_length=24",
              "lr_scheduler=constant"]  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    launch_two_processes([str(cfg), *common, "batch_size=2", f"output_dir={tmp_path / 'ddp'}"])
    train(load_config(None, [*common, "batch_size=4", f"output_dir={tmp_path / 'single'}"]))
    assert_same_run(tmp_path / "ddp", tmp_path / "single", steps=2)
    # the run report: peak host memory in summary.json and one human line at the end
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert 0.1 < summary["peak_host_rss_gib"] < 64 and summary["tokens_per_second"] > 0
    assert "trained 2 steps in" in capsys.readouterr().out.splitlines()[-1]


def test_two_process_diffusion_dpo_matches_one_process(tmp_path):
    """Each pair's dropout, flip, ε and t come from its own seed, so the process layout does not matter;
    the two processes fill one lazy latent cache between them, the single process a cache of its own."""
    model = make_tiny_sd15(tmp_path / "sd15", seed=0)
    runs = {}
    for name in ("ddp", "single"):  # a copy of the data each: caches live beside the data
        train_file, eval_file = make_image_style_task(tmp_path / f"task-{name}", n_train=8, n_eval=4, seed=1)
        runs[name] = [f"dataset={train_file}", f"eval_dataset={eval_file}", f"output_dir={tmp_path / name}"]
    common = [f"model={model}", "report_to=none", "diffusion.resolution=64", "diffusion.random_flip=true",
              "diffusion.prompt_dropout=0.5", "loss.beta=5000", "max_steps=6", "eval_batch_size=2",
              "learning_rate=1e-4", "log_every=1", "lr_scheduler=constant", "save_every=4"]  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    launch_two_processes([str(cfg), *common, "batch_size=1", *runs["ddp"]])
    train(load_config(None, [*common, "batch_size=2", *runs["single"]]))
    assert_same_run(tmp_path / "ddp", tmp_path / "single", steps=6, later_rel=2e-3)  # epoch 2 reads the cache
    chunks = list((tmp_path / "task-ddp" / ".mmpref_cache").glob("latents-*/chunk-*.safetensors"))
    assert len({c.name.split("-")[-1] for c in chunks}) >= 2  # both processes wrote chunks of their own
