"""Peak host memory (RSS) of building the text training data, and of a few training steps, at 1k and 50k rows.

Each measurement runs in a fresh process (the peak RSS of a process never goes down), on synthetic
paired rows shaped like HH / TL;DR (prompts of 40–160 words, answers of 10–80 words; a few hundred
tokens per row with the tiny byte-level tokenizer of ``mmpref.tiny_models.make_tiny_lm``):

* ``data``: ``TextTask`` built in one process (load, validate, tokenize, index, plus the tiny model of a
  few MiB and its reference copy); reported as the peak RSS and the RSS held afterwards, each minus the
  RSS of the same process before the task was built (Python, torch, transformers), so the figures are
  the data's own;
* ``train``: ``mmpref.training.train`` for a few steps (data + optimizer + steps + final save), peak RSS.

The reference is a frozen copy of the tiny model (``precompute_ref=false``), so the run does not
spend minutes on a reference pass over 50k rows; that pass adds two floats per row to the data.
Run from the repository root:

    python benchmarks/data_memory.py                  # 1k and 50k rows, ~2 min on 2 CPU cores
    python benchmarks/data_memory.py --rows 1000 5000
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was be by this are or at from have not but what all "
         "were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after "
         "words called just where most know get through back much before go good new write our used me man "
         "too any day same right look think also around another came come work three word must because does "
         "part even place well such here take why things help put years different away again off went old "
         "number great tell men say small every found still between name should home big give air line set "
         "own under read last never us left end along while might next sound below saw something thought both "
         "few those always looked show large often together asked house world going want school important "
         "until form food keep children feet land side without boy once animals life enough took sometimes "
         "four head above kind began almost live page got earth need far hand high year mother light parts "
         "country father let night following picture being study second eyes soon times story boys since "
         "white days ever paper hard near sentence better best across during today others however sure means "
         "knew its try told young miles sun ways thing whole hear example heard several change answer room "
         "sea against top turned learn point city play toward five using himself usually").split()


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(40, 160), "chosen": text(10, 80), "rejected": text(10, 80)}) + "\n")


def overrides(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return [f"model={model}", f"dataset={data}", f"output_dir={out}", f"max_steps={steps}", "batch_size=4",
            "precompute_ref=false", "report_to=none", "eval_every=0", "log_every=1", "max_length=512",
            "max_prompt_length=384"]  # fmt: skip


def child(stage: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from accelerate import Accelerator

    from mmpref.training import load_config, train
    from mmpref.training.text_task import TextTask

    torch.set_num_threads(1)
    cfg = load_config(None, overrides(model, data, out, steps))
    if stage == "data":
        import transformers  # noqa: F401  (imported before the baseline, as training has it)

        accelerator = Accelerator(cpu=True)
        before = current_rss_mib()
        start = time.perf_counter()
        task = TextTask(cfg, accelerator)
        seconds = time.perf_counter() - start
        return {"rows": len(task.train), "seconds": round(seconds, 1), "rss_before_mib": round(before, 1),
                "data_peak_mib": round(max_rss_mib() - before, 1),
                "data_held_mib": round(current_rss_mib() - before, 1)}  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": round(time.perf_counter() - start, 1), "train_peak_mib": round(max_rss_mib(), 1),
            "summary_peak_host_rss_gib": summary.get("peak_host_rss_gib")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 50_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, model, data, out = args.child
        print(json.dumps(child(stage, Path(model), Path(data), Path(out), args.steps)))
        return

    from mmpref.tiny_models import make_tiny_lm

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_lm(root / "lm", seed=0)
        for n in args.rows:
            data = root / f"rows-{n}.jsonl"
            write_rows(data, n)
            row = {"rows": n, "file_mib": round(data.stat().st_size / 2**20, 1)}
            for stage in ("data", "train"):
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", stage, str(model), str(data),
                       str(root / f"out-{n}-{stage}")]  # fmt: skip
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                measured[f"{stage}_seconds"] = measured.pop("seconds")
                row.update(measured)
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| rows | JSONL | data: peak RSS | data: held | data: build s | train (few steps): peak RSS |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']:,} | {r['file_mib']} MiB | {r['data_peak_mib']} MiB | {r['data_held_mib']} MiB "
              f"| {r['data_seconds']} | {r['train_peak_mib']} MiB |")


if __name__ == "__main__":
    main()
