"""End-to-end demo on tiny local models: the loss core, DPO and RPO on the bundled text task, then
Diffusion-RPO on the bundled image style task.

Run from the repository root:  python scripts/demo.py   (scripts/demo.sh installs first)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmpref import dpo_loss, rpo_loss
from mmpref.metrics import FeatureEmbedder, evaluate_style
from mmpref.metrics.evaluate import run_eval_images
from mmpref.metrics.tiny_scorers import make_tiny_scorers
from mmpref.tiny_models import make_tiny_clip, make_tiny_lm, make_tiny_sd15, pretrain_tiny_sd15
from mmpref.training import load_config, train

ROOT = Path(__file__).resolve().parent.parent


def loss_core() -> None:
    print("== loss core: per-sample log-ratios in, loss and metrics out")
    chosen, rejected = torch.tensor([0.8, 0.1, -0.3]), torch.tensor([0.2, 0.4, -0.9])
    for loss_type in ("sigmoid", "ipo", "hinge"):
        print(f"  {loss_type:8s} loss = {dpo_loss(chosen, rejected, beta=0.5, loss_type=loss_type).loss:.4f}")
    prompts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.0, 1.0]]), dim=-1)
    out = rpo_loss(chosen, rejected, beta=0.5, chosen_embeddings=prompts)
    print(f"  rpo      loss = {out.loss:.4f}  (mean weight on the own pair: {out.metrics['rpo/diagonal_weight']:.2f})")


def accuracy(output_dir: Path) -> tuple[float, float]:
    evals = [r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    return evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]


def main() -> int:
    loss_core()
    model = ROOT / "runs" / "tiny" / "lm"
    if not (model / "config.json").is_file():
        make_tiny_lm(model)
    results = {}
    for name in ("dpo", "rpo_paired"):
        print(f"\n== training {name} on data/text_rules with the tiny LM (configs/text/{name}.yaml)")
        cfg = load_config(ROOT / "configs" / "text" / f"{name}.yaml", [f"model={model}"])
        cfg.dataset, cfg.eval_dataset = str(ROOT / cfg.dataset), str(ROOT / cfg.eval_dataset)
        cfg.output_dir = str(ROOT / cfg.output_dir)
        train(cfg)
        results[name] = accuracy(Path(cfg.output_dir))
    results["diffusion-rpo"] = diffusion_rpo()
    print("\n== held-out reward accuracy (chosen preferred over rejected), before → after training")
    for name, (before, after) in results.items():
        where = "runs/tiny/sd15-rpo" if name == "diffusion-rpo" else f"runs/text/{name}"
        print(f"  {name:13s} {before:.2f} → {after:.2f}   curves: {where}/training_curves.png")
    print("  diffusion samples, reference beside trained (same seeds): runs/tiny/sd15-rpo/samples/latest.png")
    return 0 if all(after > 0.7 for _, after in results.values()) else 1


def diffusion_rpo() -> tuple[float, float]:
    """Diffusion-RPO on data/image_style: the chosen image of each pair carries a style (broad stripes, warm
    tint). The tiny SD 1.5 first learns the task's images (its VAE as an autoencoder, its UNet plain
    denoising of both sides alike), so the reference is a denoiser that draws pictures, as SD 1.5 is;
    then configs/sd15/rpo.yaml runs with tiny-model overrides."""
    tiny, data = ROOT / "runs" / "tiny", ROOT / "data" / "image_style"
    if not (tiny / "clip" / "open_clip_config.json").is_file():
        make_tiny_clip(tiny / "clip")
    denoiser = tiny / "sd15-denoiser"
    if not (denoiser / "unet" / "config.json").is_file():
        print("\n== tiny SD 1.5: training its VAE on the task's images, then its UNet on plain denoising")
        pretrain_tiny_sd15(make_tiny_sd15(tiny / "sd15"), data / "train.jsonl", denoiser, vae_steps=600,
                           unet_steps=1000)  # fmt: skip
    print("\n== training Diffusion-RPO on data/image_style (configs/sd15/rpo.yaml, tiny overrides)")
    prompts = ["a red circle on a blue background", "a green square on a white background",
               "a yellow cross on a black background", "a white triangle on a red background",
               "a blue square on a yellow background", "a purple circle on a gray background",
               "a black triangle on a green background", "a gray cross on a purple background"]  # fmt: skip
    out = tiny / "sd15-rpo"
    overrides = [
        f"model={denoiser}", f"dataset={data / 'train.jsonl'}", f"eval_dataset={data / 'eval.jsonl'}",
        f"output_dir={out}", f"rpo.clip_model=local-dir:{tiny / 'clip'}", "rpo.clip_weights=null",
        "diffusion.resolution=64", "diffusion.random_flip=false", "diffusion.prompt_dropout=0",
        "diffusion.eval_noise_draws=8", "batch_size=16", "eval_batch_size=48", "gradient_accumulation_steps=1",
        "learning_rate=1e-4", "lr_scheduler=constant", "warmup_steps=0", "max_steps=200", "eval_every=100",
        "save_every=0", "log_every=25", "mixed_precision=no", "gradient_checkpointing=false",
        f"samples.prompts={','.join(prompts)}", f"samples.style_refs={data / 'style_refs'}",
        "samples.num_inference_steps=50",
    ]  # fmt: skip
    train(load_config(ROOT / "configs" / "sd15" / "rpo.yaml", overrides))
    # The tiny CLIP is random, so its style scores say nothing; a texture feature that sees stripes does.
    embedder = FeatureEmbedder(_stripe_features)
    samples = out / "samples"
    for name, folder in (("reference", samples / "reference"), ("trained", samples / "step-00000200")):
        score = evaluate_style(embedder, folder, data / "style_refs", n_resamples=200).metrics["style_score"]
        print(f"  {name:9s} samples: style score (stripe feature, not CLIP) {score.value:.3f} "
              f"[{score.ci_low:.3f}, {score.ci_high:.3f}]")  # fmt: skip
    # The papers' preference scorers, as tiny random stand-ins (real weights: docs/evaluation.md): the
    # numbers mean nothing here, the report, table and contact sheet are what a real run writes.
    print("\n== mmpref eval images: reference vs trained samples, tiny random scorers")
    models = make_tiny_scorers(tiny / "scorers")
    result = run_eval_images(reference=samples / "reference", trained=samples / "step-00000200",
                             scorers=list(models), scorer_models=models, out=out / "eval", device="cpu")  # fmt: skip
    print(result.table)
    print(f"  contact sheet: {result.sheet_path.relative_to(ROOT)}")
    return accuracy(out)


def _stripe_features(image) -> np.ndarray:
    """Brightness change along the two diagonals: broad diagonal stripes change little along one and a
    lot along the other (the first feature, their difference); a plain scene changes little along both."""
    x = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    d1, d2 = np.abs(x[1:, 1:] - x[:-1, :-1]).mean(), np.abs(x[1:, :-1] - x[:-1, 1:]).mean()
    return np.array([abs(d1 - d2), min(d1, d2)])


if __name__ == "__main__":
    sys.exit(main())
