"""``mmpref train``, ``validate-data``, ``cache``, ``make-tiny`` and ``sample``: training runs, their data
checked or encoded ahead, tiny demo models, a run's images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `mmpref train` exit codes besides 0: 1 a non-finite loss or gradient stopped the run; 2 a config,
# data or checkpoint problem stopped it before training (or, with fail_on_low_disk, too little disk);
# 74 (sysexits' EX_IOERR, every command) the disk filled up while writing, and `--resume` continues from the
# newest complete checkpoint once space is freed; 75 (sysexits' EX_TEMPFAIL) SIGTERM / SIGINT
# stopped it at a step boundary after saving a checkpoint, and `--resume` continues it.
EXIT_NONFINITE = 1
EXIT_DISK_FULL = 74
EXIT_INTERRUPTED = 75
TINY_SCORER_KINDS = ("pickscore", "hpsv2", "imagereward", "aesthetic")  # clipscore takes `make-tiny clip`


def _train(args: argparse.Namespace) -> int:
    from mmpref.training import ConfigError, load_config, train
    from mmpref.training.events import NonFiniteLossError, TrainingInterrupted

    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes: only with --resume (it lets a resume go on after the run changed)")
    cfg = load_config(args.config, args.overrides)
    try:
        final = train(cfg, resume=args.resume, allow_changes=args.allow_changes)
    except TrainingInterrupted as e:
        print(f"mmpref train: {e}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as e:
        print(f"mmpref train: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    print(f"final model: {final}")
    return 0


def _validate_data(args: argparse.Namespace) -> int:
    from mmpref.training import load_config
    from mmpref.training.data_check import find_bad_rows

    cfg = load_config(args.config, args.overrides)
    found = find_bad_rows(cfg)
    for name, bad in found.items():
        for row in bad:
            print(f"{name}: {row}")
    total = sum(len(b) for b in found.values())
    print(f"{total} bad rows in {', '.join(str(n) for n in found)}" if total else "every row is usable")
    return 1 if total else 0


def _cache(args: argparse.Namespace) -> int:
    from mmpref.training import ConfigError, load_config
    from mmpref.training.data_check import fill_caches, is_diffusion

    cfg = load_config(args.config, args.overrides)
    if not is_diffusion(cfg):
        raise ConfigError("model: `mmpref cache` encodes image data for a diffusion model; text rows are "
                          "tokenized (and their reference log-probs cached) by `mmpref train` itself")  # fmt: skip
    for folder in fill_caches(cfg):
        print(f"cache complete: {folder}")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from mmpref.tiny_models import MAKERS, pretrain_tiny_sd15
    from mmpref.training.config import ConfigError

    if args.kind in TINY_SCORER_KINDS:  # a scorer in its authors' layout, for `mmpref eval images` demos
        from mmpref.metrics.tiny_scorers import TINY_SCORERS

        path = TINY_SCORERS[args.kind](args.out_dir, seed=args.seed)
    elif args.pretrain_on is None:
        path = MAKERS[args.kind](args.out_dir, seed=args.seed)
    else:  # a tiny SD 1.5 whose UNet already denoises the task's images: a reference worth aligning
        import tempfile

        if args.kind != "sd15":
            raise ConfigError("--pretrain-on: only for make-tiny sd15")
        with tempfile.TemporaryDirectory() as tmp:
            random_init = MAKERS["sd15"](Path(tmp) / "sd15", seed=args.seed)
            path = pretrain_tiny_sd15(random_init, args.pretrain_on, args.out_dir, unet_steps=args.unet_steps,
                                      vae_steps=args.vae_steps, seed=args.seed)  # fmt: skip
    print(f"tiny {args.kind} written to {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mmpref.training.sampling import run_sample

    out, prompts = run_sample(args.target, args.prompts, out=args.out, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance_scale, resolution=args.resolution,
                              device=args.device)  # fmt: skip
    print(f"{len(prompts)} prompts: {out / 'reference'}, {out / 'trained'}, grid {out / 'grid.png'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="preference-train a model from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. loss.type=rpo max_steps=20")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in output_dir, or from the given one")  # fmt: skip
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: resume a checkpoint written for another model, data or objective (the "
                   "changes are logged; changed data starts from its first row)")  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("validate-data", help="read every row of a config's data (images decoded) and list the bad "
                       "ones; exit 1 when there are any")  # fmt: skip
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_validate_data)

    p = sub.add_parser("cache", help="encode a diffusion config's data into its caches before training "
                       "(accelerate launch -m mmpref.cli cache CONFIG: every process takes its share; resumable)")  # fmt: skip
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cache)

    p = sub.add_parser("make-tiny", help="write a tiny random model folder (for demos and tests)")
    p.add_argument("kind", choices=["lm", "sd15", "sdxl", "clip", *TINY_SCORER_KINDS])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-on", type=Path, default=None, metavar="DATASET",
                   help="sd15: train the UNet on plain denoising of this image dataset's images")  # fmt: skip
    p.add_argument("--unet-steps", type=int, default=400, help="with --pretrain-on: UNet denoising steps")
    p.add_argument("--vae-steps", type=int, default=0,
                   help="with --pretrain-on: first train the VAE as an autoencoder of the images (600: pictures)")  # fmt: skip
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser(
        "sample", help="generate images with a trained UNet beside its reference (same prompts, same seeds)"
    )
    p.add_argument("target", help="a training config, its output_dir, or output_dir/final")
    p.add_argument(
        "--prompts", required=True, help="text file, one prompt per line (or .jsonl with 'prompt')"
    )
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/samples)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i on both sides")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None, help="default: the pipeline's own")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=_sample)
