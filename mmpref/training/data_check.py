"""A run's data before the run: every row checked (``mmpref validate-data``), or every cache filled
(``mmpref cache``), so a user can spend CPU time on the data before spending GPU hours on training."""

from __future__ import annotations

from pathlib import Path

from mmpref.data.errors import BadRow
from mmpref.data.splits import config_sources
from mmpref.data.validation import prepare_text_dataset
from mmpref.losses import Objective
from mmpref.training.config import TrainConfig
from mmpref.training.plan import modality_of, model_source


def is_diffusion(cfg: TrainConfig) -> bool:
    """The config trains a diffusion pipeline (``modality``, else the model's marker file: no weights load)."""
    return modality_of(cfg, model_source(cfg)) == "diffusion"


def find_bad_rows(cfg: TrainConfig) -> dict[str, list[BadRow]]:
    """Every bad row of the config's training and eval data, by source name; image rows have their images
    read and decoded, a row at a time (bounded memory, a progress bar)."""
    found: dict[str, list[BadRow]] = {}
    objective = Objective.from_config(cfg.loss, cfg.rpo)
    needs = {"needs_scores": objective.needs_scores, "chosen_scores_higher": objective.chosen_scores_higher}
    diffusion = is_diffusion(cfg)
    (train, options), evaluation = config_sources(cfg)
    for source, opts in [(train, options), *([evaluation] if evaluation else [])]:
        if diffusion:
            from mmpref.data.images import prepare_image_dataset, validate_image_data

            rows = prepare_image_dataset(source, on_bad_rows="skip", image_root=cfg.image_root,
                                         confine_image_paths=cfg.confine_image_paths, **opts, **needs)  # fmt: skip
            bad = rows.bad + validate_image_data(rows)
            found[str(rows.source)] = sorted(bad, key=lambda b: b.row)
        else:
            data = prepare_text_dataset(source, on_bad_rows="skip", **opts, **needs)
            found[str(data.source)] = data.bad
    return found


def fill_caches(cfg: TrainConfig) -> list[Path]:
    """Encode every row of a diffusion config's data into its caches (latents, CLIP embeddings), each
    process of a launch taking its share; returns the cache folders. Rows cached before are skipped.
    ``cfg`` trains a diffusion model (:func:`is_diffusion`)."""
    from mmpref.training.build import make_task
    from mmpref.training.loop import _make_accelerator
    from mmpref.training.plan import plan

    cfg.diffusion.cache_latents = "ahead"
    accelerator = _make_accelerator(cfg, [], Path(cfg.output_dir))
    task = make_task(plan(cfg, accelerator), accelerator)
    task.build_artifacts(task.load_models(), task.prepare_splits())  # `ahead`: every row encoded here
    return [c.folder for s in task.splits() for c in s.caches()]
