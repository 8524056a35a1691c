"""GPU check of ``diffusion.cache_latents`` (lazy / ahead / off): time to step 1, steps/s, ahead fill rate.

Usage: ``PYTHONPATH=. python3 scripts/gpu_image_check.py [--tiny] [--out result.json]`` (``--tiny``: the tiny
SD 1.5 at 64 px and a few pairs, a CPU smoke run of this script).

SD 1.5's architecture with random weights (``benchmarks/diffusion_step.py``'s ``build_sd15_folder``, nothing
downloaded) at 512 px on Pick-a-Pic-shaped Parquet rows (``benchmarks/image_data.py``'s ``image_pool`` and
``write_pairs``: caption, jpg_0, jpg_1, label_0; 512x512 JPEGs). Each mode trains ``configs/sd15/dpo.yaml``
(full UNet, fp16 mixed precision, gradient checkpointing, loss.beta 5000) through ``mmpref.training.train`` in
a fresh process, from its own copy of the data file (so its ``.mmpref_cache`` starts empty) and its own
``MMPREF_CACHE``. Per mode: wall time from the process's launch to the end of step 1, steps/s of epoch 1
without step 1 and of epoch 2, the time ``fill_caches`` took (ahead), ``torch.cuda.max_memory_allocated``.
The child exits right after its last step (no final save). One JSON file and a printed table.
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
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "sd15" / "dpo.yaml"
PICKAPIC_PAIRS = 959_000
RESULT = "RESULT "


# ------------------------------------------------------------------------------------------- child


def child(spec: dict[str, Any]) -> None:
    import torch

    import mmpref.training.diffusion_task as dt
    import mmpref.training.loop as loop
    from mmpref.training import Callback, load_config, train

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res: dict[str, Any] = {"mode": spec["mode"], "imports_s": round(time.time() - spec["t0"], 2)}
    stamps: list[float] = []  # perf_counter after every step (scaler-skipped ones too)
    applied: list[float] = []  # perf_counter at every on_step_end (steps the fp16 scaler did not skip)

    fill = dt.DiffusionTask.fill_caches

    def timed_fill(self):
        sync()
        t = time.perf_counter()
        fill(self)
        sync()
        res["fill_s"] = round(time.perf_counter() - t, 2)

    dt.DiffusionTask.fill_caches = timed_fill

    start = loop._Run.start_steps

    def timed_start(self):
        res["setup_done_s"] = round(time.time() - spec["t0"], 2)  # launch -> the loop's first batch
        start(self)

    loop._Run.start_steps = timed_start

    def finish() -> None:  # after the last step: the figures, then exit without the final save
        n, per_epoch = len(stamps), spec["per_epoch"]
        s = stamps
        res.update(
            steps=n,
            steps_per_epoch=per_epoch,
            scaler_skipped_steps=n - len(applied),
            stamps=[round(t - s[0], 3) for t in s],
        )  # s since the end of step 1
        if n >= 2:
            k = min(n, per_epoch)
            res["epoch1_steps"] = k
            res["epoch1_steps_per_s"] = round((k - 1) / (s[k - 1] - s[0]), 3)  # epoch 1 without step 1
        if n >= 2 * per_epoch:
            res["epoch2_steps_per_s"] = round(per_epoch / (s[2 * per_epoch - 1] - s[per_epoch - 1]), 3)
        loop_t = res.pop("_loop_t", None)
        if n and loop_t is not None:
            res["step1_s"] = round(s[0] - loop_t, 2)  # the loop's first batch (lazy: its encoding) and step
        if cuda:
            res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(RESULT + json.dumps(res), flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    step = loop._Run.step

    def timed_step(self):
        if not stamps:
            sync()
            res["_loop_t"] = time.perf_counter()
        step(self)
        sync()
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            res["time_to_step1_s"] = round(time.time() - spec["t0"], 2)
            if cuda:
                res["max_memory_allocated_step1_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if len(stamps) % 8 == 1:  # what a parent that times this child out can still read
            Path(spec["partial"]).write_text(
                json.dumps({**res, "stamps": [round(t - stamps[0], 3) for t in stamps]})
            )
        if self.state["step"] >= self.max_steps:
            finish()

    loop._Run.step = timed_step

    class Clock(Callback):
        def on_step_end(self, step: int, model) -> None:
            sync()
            applied.append(time.perf_counter())

    overrides = [
        f"model={spec['model']}", f"dataset={spec['data']}", "eval_dataset=", "eval_split=0",
        f"output_dir={spec['out']}", "report_to=none", "samples.prompts=[]", "eval_every=0", "save_every=0",
        "log_every=1000000", f"diffusion.resolution={spec['resolution']}", f"batch_size={spec['batch_size']}",
        "gradient_accumulation_steps=1", f"mixed_precision={spec['mixed_precision']}",
        f"gradient_checkpointing={'true' if spec['gradient_checkpointing'] else 'false'}",
        f"diffusion.cache_latents={spec['mode']}", f"max_steps={spec['steps']}", "warmup_steps=0",
    ]  # fmt: skip
    if spec.get("lora"):
        overrides += ["lora.r=8", "lora.alpha=8"]
    cfg = load_config(CONFIG, overrides)
    res["config"] = {"loss.beta": cfg.loss.beta, "lora": cfg.lora is not None, "random_flip": cfg.diffusion.random_flip,
                     "eval_batch_size": cfg.eval_batch_size, "learning_rate": cfg.learning_rate}  # fmt: skip
    train(cfg, callbacks=[Clock()])
    finish()  # only if the loop ended without the wrapper seeing max_steps


# ------------------------------------------------------------------------------------------ parent


def make_data(path: Path, n: int) -> None:
    """Pick-a-Pic-shaped Parquet rows from benchmarks/image_data.py (512x512 JPEGs, caption, label_0)."""
    from benchmarks.image_data import image_pool, write_pairs

    write_pairs(path, n, image_pool(64 if n <= 64 else 256))


def run_child(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "MMPREF_CACHE": str(work / "mmpref-home"), "HF_HOME": str(work / "hf-home"),
           "HF_DATASETS_CACHE": str(work / "hf-datasets"), "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    spec = {**spec, "t0": time.time()}  # the launch: time to step 1 counts interpreter start and imports
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    log = work / "child.log"
    try:
        with open(log, "w") as err:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=work,
                                  timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        out = {"mode": spec["mode"], "error": f"timed out after {timeout:.0f} s"}
        partial = Path(spec["partial"])
        if partial.is_file():  # step 1's figures and the step times (s after step 1) up to the last write
            out["partial"] = json.loads(partial.read_text())
        return out
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        print("\n".join(tail), flush=True)
        return {"mode": spec["mode"], "error": f"exit code {done.returncode}: " + " | ".join(tail[-3:])}
    return {**json.loads(lines[-1][len(RESULT) :]), "process_s": round(time.time() - spec["t0"], 1)}


def table(results: list[dict[str, Any]], pairs: int) -> str:
    cols = [("mode", "mode"), ("steps", "steps"), ("time_to_step1_s", "launch->step1 s"),
            ("setup_done_s", "launch->loop s"), ("fill_s", "fill s"), ("epoch1_steps_per_s", "ep1 steps/s"),
            ("epoch2_steps_per_s", "ep2 steps/s"), ("scaler_skipped_steps", "fp16 skips"),
            ("max_memory_allocated_gib", "max alloc GiB")]  # fmt: skip
    rows = [[h for _, h in cols]]
    for r in results:
        if "error" in r:
            rows.append([r["mode"], "ERROR: " + r["error"][:100]] + [""] * (len(cols) - 2))
            continue
        rows.append([str(r.get(k, "-")) if r.get(k) is not None else "-" for k, _ in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for r in results:
        if r.get("fill_s"):
            rate = pairs / r["fill_s"]
            out.append(f"{r['mode']}: fill {pairs} pairs in {r['fill_s']} s = {rate:.1f} pairs/s; "
                       f"959,000 pairs (Pick-a-Pic v2) at that rate: {PICKAPIC_PAIRS / rate / 3600:.2f} h")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny SD 1.5 at 64 px, 32 pairs: a CPU smoke run")
    p.add_argument("--pairs", type=int, help="default 512 (tiny: 32)")
    p.add_argument("--batch-size", type=int, help="default 8 (tiny: 4)")
    p.add_argument("--modes", nargs="+", default=["ahead", "off", "lazy"], choices=["lazy", "ahead", "off"])
    p.add_argument(
        "--short-steps", type=int, help="steps of ahead and off (default 24; tiny 4); lazy: 2 epochs"
    )
    p.add_argument("--lora", action="store_true", help="LoRA r=8 instead of the full UNet")
    p.add_argument("--mixed-precision", help="default fp16 on a GPU, no on CPU")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mode")
    p.add_argument(
        "--deadline", type=float, help="seconds for the whole script: a mode gets at most what is left"
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/mmpref-gpu-image-check"))
    p.add_argument("--out", type=Path, help="the JSON result (default: --work/result.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    import torch

    t_start = time.time()
    pairs = args.pairs or (32 if args.tiny else 512)
    batch = args.batch_size or (4 if args.tiny else 8)
    short = args.short_steps or (4 if args.tiny else 24)
    per_epoch = pairs // batch
    resolution = 64 if args.tiny else 512
    cuda = torch.cuda.is_available()
    mixed = args.mixed_precision or ("fp16" if cuda else "no")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    }
    import datasets
    import diffusers
    import transformers

    info["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "datasets": datasets.__version__,
                        "transformers": transformers.__version__, "python": sys.version.split()[0]}  # fmt: skip
    print(json.dumps(info), flush=True)

    t = time.time()
    model = work / "model"
    if args.tiny:
        from mmpref.tiny_models import make_tiny_sd15

        make_tiny_sd15(model)
    else:
        from benchmarks.diffusion_step import build_sd15_folder

        build_sd15_folder(model, seed=0)
    info["model_build_s"] = round(time.time() - t, 1)
    t = time.time()
    data = work / "data" / "train.parquet"
    make_data(data, pairs)
    info["data_write_s"] = round(time.time() - t, 1)
    info["data_mib"] = round(data.stat().st_size / 2**20, 1)
    print(f"model {info['model_build_s']} s, data {pairs} pairs ({info['data_mib']} MiB) {info['data_write_s']} s",
          flush=True)  # fmt: skip

    setting = {"model": "tiny SD 1.5" if args.tiny else "SD 1.5 architecture, random weights", "resolution": resolution,
               "pairs": pairs, "batch_size": batch, "steps_per_epoch": per_epoch, "mixed_precision": mixed,
               "gradient_checkpointing": not args.no_gradient_checkpointing, "lora": args.lora}  # fmt: skip
    results = []
    for mode in args.modes:
        mwork = work / mode
        (mwork / "data").mkdir(parents=True)
        shutil.copy(data, mwork / "data" / "train.parquet")  # its own folder: its own empty .mmpref_cache
        steps = 2 * per_epoch if mode == "lazy" else short
        spec = {"mode": mode, "model": str(model), "data": str(mwork / "data" / "train.parquet"),
                "out": str(mwork / "run"), "steps": steps, "per_epoch": per_epoch, "resolution": resolution,
                "batch_size": batch, "mixed_precision": mixed, "lora": args.lora,
                "gradient_checkpointing": not args.no_gradient_checkpointing}  # fmt: skip
        spec["partial"] = str(mwork / "partial.json")
        timeout = args.timeout
        if args.deadline:
            timeout = min(timeout, args.deadline - (time.time() - t_start) - 5)
        if timeout < 30:
            r = {"mode": mode, "error": "not run: the deadline was too close"}
        else:
            r = run_child(spec, mwork, timeout)
        print(f"{mode}: {json.dumps(r)}", flush=True)
        results.append(r)
        shutil.rmtree(mwork, ignore_errors=True)
    for r in results:
        if r.get("fill_s"):
            r["fill_pairs_per_s"] = round(pairs / r["fill_s"], 2)
            r["pickapic_fill_h"] = round(PICKAPIC_PAIRS / r["fill_pairs_per_s"] / 3600, 2)
    text = table(results, pairs)
    print("\n" + json.dumps(setting) + "\n" + text, flush=True)
    info["total_s"] = round(time.time() - t_start, 1)
    out = args.out or work / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "setting": setting, "results": results}, indent=2))
    print(f"wrote {out} (total {info['total_s']} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
