"""Write the bundled image preference task (data/image_style): styled (chosen) vs plain (rejected) scenes.

    python scripts/make_image_task.py [--out data/image_style] [--n-train 160] [--n-eval 48] [--seed 0]

See :mod:`mmpref.data.image_task` for what the images show and why the task is learnable.
"""

from __future__ import annotations

import argparse

from mmpref.data.image_task import make_image_style_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/image_style")
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train, evald = make_image_style_task(a.out, a.n_train, a.n_eval, a.size, a.seed)
    print(f"wrote {train} and {evald}")


if __name__ == "__main__":
    main()
