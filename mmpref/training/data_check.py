"""A run's data before the run: every row checked (``mmpref validate-data``), or every cache filled
(``mmpref cache``), so a user can spend CPU time on the data before spending GPU hours on training."""

from __future__ import annotations

from pathlib import Path

from mmpref.data.text import BadRow, config_sources, prepare_text_dataset
from mmpref.training.config import TrainConfig, model_source, score_checks


def is_diffusion(cfg: TrainConfig) -> bool:
    """The config trains a diffusion pipeline (``modality``, else the model's marker file: no weights load)."""
    if cfg.modality != "auto":
        return cfg.modality == "diffusion"
    return model_source(cfg).marker == "model_index.json"


def find_bad_rows(cfg: TrainConfig) -> dict[str, list[BadRow]]:
    """Every bad row of the config's training and eval data, by source name; image rows have their images
    read and decoded, a row at a time (bounded memory, a progress bar)."""
    found: dict[str, list[BadRow]] = {}
    (train, options), evaluation = config_sources(cfg)
    for source, opts in [(train, options), *([evaluation] if evaluation else [])]:
        if is_diffusion(cfg):
            from mmpref.data.images import prepare_image_dataset, validate_image_data

            rows = prepare_image_dataset(source, on_bad_rows="skip", image_root=cfg.image_root,
                                         confine_image_paths=cfg.confine_image_paths, **opts, **score_checks(cfg))  # fmt: skip
            bad = rows.bad + validate_image_data(rows)
            found[str(rows.source)] = sorted(bad, key=lambda b: b.row)
        else:
            data = prepare_text_dataset(source, on_bad_rows="skip", **opts, **score_checks(cfg))
            found[str(data.source)] = data.bad
    return found


def fill_caches(cfg: TrainConfig) -> list[Path]:
    """Encode every row of a diffusion config's data into its caches (latents, CLIP embeddings), each
    process of a launch taking its share; returns the cache folders. Rows cached before are skipped."""
    from mmpref.training.diffusion_task import DiffusionTask
    from mmpref.training.loop import _make_accelerator

    if not is_diffusion(cfg):
        from mmpref.errors import ConfigError

        raise ConfigError("model: `mmpref cache` encodes image data for a diffusion model; text rows are "
                          "tokenized (and their reference log-probs cached) by `mmpref train` itself")  # fmt: skip
    cfg.diffusion.cache_latents = "ahead"
    task = DiffusionTask(cfg, _make_accelerator(cfg, [], Path(cfg.output_dir)))
    return [c.folder for s in task.splits() for c in s.caches()]
