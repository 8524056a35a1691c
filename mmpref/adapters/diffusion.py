"""Diffusion adapter: implicit log-ratios ℓ of a UNet against a reference (docs/design.md §1, §2, §7).

Pure functions, no training state. For a batch of B pairs of VAE latents (chosen ``w``, rejected ``l``):

* one noise draw ε and one timestep t per *pair*, shared by its two images (sampled for the first half
  of the batch and repeated), x_t = ``scheduler.add_noise(x_0, ε, t)``;
* one policy forward over the 2B images ``[w; l]`` and one reference forward under ``torch.no_grad``;
* the target follows ``scheduler.config.prediction_type``: ε (``epsilon``) or the velocity
  ``scheduler.get_velocity(x_0, ε, t)`` (``v_prediction``); ``sample`` predicts x_0 itself;
* err = squared error averaged over the latent elements of each image, and
  ℓ = −½ · (err_θ − err_ref), so β·(ℓ_w − ℓ_l) is the published Diffusion-DPO
  ``inside_term = −½·β·((m_w − m_l) − (r_w − r_l))``: ``loss.beta: 5000`` reproduces the original
  Diffusion-DPO code (β_dpo = 5000); the diffusers example's ``beta_dpo: 2500`` is 5000 here.

The reference is anything callable like a UNet returning the prediction tensor (a frozen copy of the UNet, or
with LoRA the same UNet with its adapters switched off: :mod:`mmpref.training.reference`). Prompt helpers encode captions the way diffusers' SD 1.5 and SDXL training
scripts do, and :func:`sdxl_time_ids` builds SDXL's micro-conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Reference = Callable[..., Tensor]


@dataclass
class DiffusionLogratios:
    """ℓ and the raw errors for B pairs: every tensor is (B, 2), column 0 chosen, column 1 rejected."""

    logratios: Tensor
    model_err: Tensor
    ref_err: Tensor


# ------------------------------------------------------------------------------------------- noise


def sample_pair_noise(
    latents_w: Tensor,
    num_train_timesteps: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """One ε (B, C, h, w) and one integer timestep (B,) per pair, on the latents' device.

    ``generator`` may be one generator, or one per pair (deterministic evaluation: the draw of a pair
    then depends only on its own seed, not on the batch it lands in). With ``None`` the global RNG is used,
    so Accelerate's checkpoints (which store the RNG states) make resume exact.
    """
    b = latents_w.shape[0]
    shape, device = latents_w.shape[1:], latents_w.device
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"generator: expected one per pair ({b}), got {len(generator)}")
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generator])
        t = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generator])
        return noise.to(device, latents_w.dtype), t.to(device)
    noise = torch.randn(latents_w.shape, generator=generator, device=device, dtype=latents_w.dtype)
    t = torch.randint(0, num_train_timesteps, (b,), generator=generator, device=device)
    return noise, t


def diffusion_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet is trained to predict, by ``noise_scheduler.config.prediction_type``."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type: unsupported {kind!r} (epsilon, v_prediction or sample)")


def per_image_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error averaged over every latent element of each image: (N, ...) -> (N,), in float32."""
    return (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(1)


# ---------------------------------------------------------------------------------------- ℓ itself


def diffusion_logratios(
    unet: nn.Module,
    reference: Reference,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    noise_scheduler,
    *,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> DiffusionLogratios:
    """ℓ = −½(err_θ − err_ref) of B pairs from one policy forward and one reference forward of 2B images.

    latents_w, latents_l: (B, C, h, w) VAE latents already multiplied by ``vae.config.scaling_factor``.
    encoder_hidden_states: (B, S, D), one caption per pair (repeated for the two images).
    added_cond_kwargs: SDXL's ``{"text_embeds": (B, P), "time_ids": (B, 6)}``, per pair, or None.
    noise, timesteps: (B, C, h, w) and (B,) to fix the draw; otherwise sampled by
    :func:`sample_pair_noise` with ``generator``.
    """
    if latents_w.shape != latents_l.shape:
        raise ValueError(
            f"latents_l: shape {tuple(latents_l.shape)} differs from latents_w {tuple(latents_w.shape)}"
        )
    b = latents_w.shape[0]
    if encoder_hidden_states.shape[0] != b:
        raise ValueError(
            f"encoder_hidden_states: expected {b} rows (one per pair), got {encoder_hidden_states.shape[0]}"
        )
    if noise is None or timesteps is None:
        drawn_noise, drawn_t = sample_pair_noise(
            latents_w, noise_scheduler.config.num_train_timesteps, generator
        )
        noise = drawn_noise if noise is None else noise
        timesteps = drawn_t if timesteps is None else timesteps
    latents = torch.cat([latents_w, latents_l])
    noise2, t2 = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise2, t2)
    target = diffusion_target(noise_scheduler, latents, noise2, t2)
    ehs = encoder_hidden_states.repeat(2, 1, 1)
    added = None if added_cond_kwargs is None else {k: v.repeat(2, 1) for k, v in added_cond_kwargs.items()}

    model_err = per_image_mse(_predict(unet, noisy, t2, ehs, added), target)
    with torch.no_grad():
        ref_err = per_image_mse(_predict(reference, noisy, t2, ehs, added), target)
    model_err, ref_err = model_err.view(2, b).T, ref_err.view(2, b).T
    return DiffusionLogratios(logratios=-0.5 * (model_err - ref_err), model_err=model_err, ref_err=ref_err)


def _predict(unet: Reference, noisy: Tensor, t: Tensor, ehs: Tensor, added: dict | None) -> Tensor:
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    out = unet(noisy, t, encoder_hidden_states=ehs, **kwargs)
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


# ----------------------------------------------------------------------------------- conditioning


def sdxl_time_ids(
    original_sizes: Tensor | Sequence[Sequence[int]],
    crops_top_left: Tensor | Sequence[Sequence[int]],
    target_size: tuple[int, int] | Sequence[Sequence[int]],
) -> Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, crop left, target h, w) per image → (B, 6) float32.

    ``target_size`` is one (h, w) for the batch or one per image, as in diffusers' ``compute_time_ids``.
    """
    orig = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    crop = torch.as_tensor(crops_top_left, dtype=torch.float32).reshape(-1, 2)
    target = torch.as_tensor(target_size, dtype=torch.float32).reshape(-1, 2).expand(orig.shape[0], 2)
    if crop.shape[0] != orig.shape[0]:
        raise ValueError(f"crops_top_left: expected {orig.shape[0]} rows, got {crop.shape[0]}")
    return torch.cat([orig, crop, target], dim=1)


def tokenize_captions(tokenizer, captions: Sequence[str]) -> Tensor:
    """(B, model_max_length) input ids, padded and truncated as diffusers' training scripts do."""
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompt_sd15(text_encoder: nn.Module, input_ids: Tensor) -> Tensor:
    """SD 1.5: the CLIP text encoder's last hidden state, (B, 77, D)."""
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


def encode_prompt_sdxl(
    text_encoders: Sequence[nn.Module], input_ids: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """SDXL: penultimate hidden states of both encoders concatenated (B, 77, D1 + D2), and the pooled
    (projected) output of the last encoder (B, P) — diffusers' ``encode_prompt`` of its SDXL scripts."""
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        # diffusers takes output[0]: text_embeds of CLIPTextModelWithProjection; the last encoder's wins
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


@torch.no_grad()
def encode_images(vae: nn.Module, pixel_values: Tensor, sample: bool = False, generator=None) -> Tensor:
    """VAE latents × ``vae.config.scaling_factor`` of (N, 3, H, W) images in [-1, 1].

    ``sample=False`` (mmpref's choice, cached or not) takes the posterior mean, so a cache built once is
    exactly what a per-step encode gives; ``sample=True`` draws from it as the diffusers examples do.
    """
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return latents * vae.config.scaling_factor
