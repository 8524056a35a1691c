"""mmpref: preference alignment for causal LMs and diffusion UNets with one loss core."""

from mmpref.losses import PreferenceLossOutput, dpo_loss, rpo_loss

__version__ = "0.1.0"
__all__ = ["PreferenceLossOutput", "dpo_loss", "rpo_loss", "__version__"]
