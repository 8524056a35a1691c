"""Peak host memory (RSS) of building the text training data, and of a few training steps, against the rows.

Each measurement runs in a fresh process (the peak RSS of a process never goes down), on synthetic
paired rows of one of two shapes, tokenized by the tiny byte-level tokenizer of
``mmpref.tiny_models.make_tiny_lm``:

* ``hh`` (default): shaped like HH / TL;DR, plain strings (prompts of 40–160 words, answers of 10–80 words;
  a few hundred tokens a row), a JSON Lines file, ``max_length`` 512;
* ``ultrafeedback``: shaped like UltraFeedback, conversational (a ``prompt`` of chat messages: a user turn of
  20–250 words, sometimes a system turn or an earlier exchange; ``chosen`` / ``rejected`` one assistant turn
  of 50–400 words; ``score_chosen`` / ``score_rejected``), a Parquet file, ``max_length`` 1024 with
  ``max_prompt_length`` 512 (≈ 1,300 tokens a row).

Stages, each in its own process, in this order:

* ``data``: ``TextTask`` built in one process (``mmpref.training.build.build_task``: the plan, then load,
  validate, tokenize, index, plus the tiny model of a few MiB and its frozen reference copy), with a cold
  token cache;
* ``data-warm``: the same once more: the token ids are read back from the token cache (what a run
  resumed after a kill pays);
* ``ref``: ``TextTask`` with ``precompute_ref: true``: the reference pass over every row on top;
* ``train``: ``mmpref.training.train`` for a few steps (data + optimizer + steps + final save), peak RSS.

Task figures are the peak RSS, the RSS held afterwards and its anonymous part (RSS minus pages of
files, such as the memory-mapped Arrow rows), each minus the RSS of the same process before the task
was built (Python, torch, transformers), so they are the data's own. They are set beside the floor:
the packed token ids the run must keep plus two float32 reference log-probs a row. With two or more
row counts the script also prints the growth per added row against the floor's.

Run from the repository root:

    python benchmarks/data_memory.py                  # hh, 1k and 50k rows, data + train, ~2 min on 2 CPU cores
    python benchmarks/data_memory.py --rows 1000 5000
    python benchmarks/data_memory.py --shape ultrafeedback --rows 10000 100000 --stages data data-warm
    python benchmarks/data_memory.py --shape ultrafeedback --rows 2000 10000 --stages ref
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


SHAPES = {  # max_length, max_prompt_length, file suffix
    "hh": (512, 384, ".jsonl"),
    "ultrafeedback": (1024, 512, ".parquet"),
}
STAGES = ("data", "data-warm", "ref", "train")
MIB = 2**20


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``, ``RssAnon``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    return status_kib("VmRSS") / 1024


class AnonPeak:
    """The highest anonymous RSS seen, sampled every 20 ms on a thread (the kernel keeps no such mark)."""

    def __init__(self) -> None:
        import threading

        self.peak_kib = status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_kib, status_kib("RssAnon")) / 1024


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """HH-shaped rows (plain strings) as JSON Lines."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(40, 160), "chosen": text(10, 80), "rejected": text(10, 80)}) + "\n")


def ultrafeedback_row(text) -> dict:
    """One conversational row shaped like UltraFeedback's: chat prompt, one assistant turn each side."""
    prompt = [{"role": "user", "content": text(20, 250)}]
    if text.rng.random() < 0.2:  # some rows carry a system turn
        prompt.insert(0, {"role": "system", "content": text(10, 40)})
    if text.rng.random() < 0.2:  # some an earlier exchange
        prompt[-1:-1] = [{"role": "user", "content": text(10, 60)}, {"role": "assistant", "content": text(30, 120)}]
    chosen, rejected = round(text.rng.uniform(3, 5), 2), round(text.rng.uniform(1, 3), 2)
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(50, 400)}],
            "rejected": [{"role": "assistant", "content": text(50, 400)}],
            "score_chosen": chosen, "score_rejected": rejected}  # fmt: skip


class Words:
    """Random texts cut from one long random word sequence (fast enough for 100k long rows)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [self.rng.choice(WORDS) for _ in range(1 << 20)]

    def __call__(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        start = self.rng.randrange(len(self.pool) - n)
        return " ".join(self.pool[start : start + n]).capitalize() + "."


def write_ultrafeedback(path: Path, n: int, seed: int = 0, per_group: int = 5000) -> None:
    """UltraFeedback-shaped rows as Parquet, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = Words(seed)
    writer = None
    for start in range(0, n, per_group):
        table = pa.Table.from_pylist([ultrafeedback_row(text) for _ in range(min(per_group, n - start))])
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def overrides(shape: str, model: Path, data: Path, out: Path, steps: int, precompute: bool) -> list[str]:
    max_length, max_prompt_length = SHAPES[shape][:2]
    return [f"model={model}", f"dataset={data}", f"output_dir={out}", f"max_steps={steps}", "batch_size=4",
            f"precompute_ref={str(precompute).lower()}", "report_to=none", "eval_every=0", "log_every=1",
            f"max_length={max_length}", f"max_prompt_length={max_prompt_length}"]  # fmt: skip


def token_bytes(task) -> int:
    """Bytes of the packed token ids of the training rows (what the run must keep)."""
    ids = task.train.rows._ids
    return len(ids) * ids.itemsize


def watch_reference_pass(text_task) -> dict:
    """Wrap the reference pass (``text_task.reference_logps``, which ``TextTask.make_reference`` calls for each
    split) so that its own anonymous memory is measured: the peak over the RSS at its start (activations of a
    batch: flat in the rows) and what it keeps (the log-probs: 8 bytes a row)."""
    figures, original = {}, text_task.reference_logps

    def measured(model, split, **kwargs):
        start, anon = status_kib("RssAnon") / 1024, AnonPeak()
        begun = time.perf_counter()
        out = original(model, split, **kwargs)
        figures.update(ref_seconds=round(time.perf_counter() - begun, 1), ref_anon_peak_mib=anon.stop() - start,
                       ref_anon_held_mib=status_kib("RssAnon") / 1024 - start)  # fmt: skip
        return out

    text_task.reference_logps = measured
    return figures


def child(stage: str, shape: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from accelerate import Accelerator

    from mmpref.training import load_config, text_task, train
    from mmpref.training.build import build_task

    torch.set_num_threads(1)
    cfg = load_config(None, overrides(shape, model, data, out, steps, precompute=stage == "ref"))
    if stage != "train":
        import transformers  # noqa: F401  (imported before the baseline, as training has it)

        accelerator = Accelerator(cpu=True)
        ref_pass = watch_reference_pass(text_task) if stage == "ref" else {}
        before, anon_before = current_rss_mib(), status_kib("RssAnon") / 1024
        anon = AnonPeak()
        start = time.perf_counter()
        task = build_task(cfg, accelerator)  # a TextTask
        seconds = time.perf_counter() - start
        anon_peak = anon.stop()
        rows = len(task.train)
        return {"rows": rows, "tokens": len(task.train.rows._ids), "seconds": round(seconds, 1),
                "token_mib": token_bytes(task) / MIB, "floor_mib": (token_bytes(task) + 8 * rows) / MIB,
                "rss_before_mib": before, "peak_mib": max_rss_mib() - before,
                "held_mib": current_rss_mib() - before, "anon_peak_mib": anon_peak - anon_before,
                "anon_held_mib": status_kib("RssAnon") / 1024 - anon_before, **ref_pass}  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": round(time.perf_counter() - start, 1), "peak_mib": max_rss_mib(),
            "summary_peak_host_rss_gib": summary.get("peak_host_rss_gib")}  # fmt: skip


def measure(stage: str, shape: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--shape", shape, "--steps", str(steps), "--child", stage, str(model),
           str(data), str(out)]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_row(m: dict, key: str) -> float:
    return m[key] * MIB / m["rows"]


def print_tables(results: list[dict]) -> None:
    """One line per (rows, stage): MiB, bytes a row, and the ratio to the floor's bytes a row."""
    print("\n| rows | file | stage | build s | tokens/row | floor B/row | peak | held | held anon | "
          "held / floor | held anon / floor |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["stage"] == "train":
            print(f"| {r['rows']:,} | {r['file_mib']:.1f} MiB | train | {r['seconds']} | | | "
                  f"{r['peak_mib']:.0f} MiB (process) | | | | |")
            continue
        floor = per_row(r, "floor_mib")
        print(f"| {r['rows']:,} | {r['file_mib']:.1f} MiB | {r['stage']} | {r['seconds']} | "
              f"{r['tokens'] / r['rows']:.0f} | {floor:.0f} | {r['peak_mib']:.0f} MiB | {r['held_mib']:.0f} MiB | "
              f"{r['anon_held_mib']:.0f} MiB | {per_row(r, 'held_mib') / floor:.2f} | "
              f"{per_row(r, 'anon_held_mib') / floor:.2f} |")
    for r in results:
        if "ref_seconds" in r:
            print(f"reference pass, {r['rows']:,} rows: {r['ref_seconds']} s, anonymous memory peak "
                  f"+{r['ref_anon_peak_mib']:.1f} MiB over its start, held +{r['ref_anon_held_mib']:.2f} MiB "
                  f"({r['ref_anon_held_mib'] * MIB / r['rows']:.0f} B a row; the log-probs take 8)")
    print_growth(results)


def print_growth(results: list[dict]) -> None:
    """Per stage, between the smallest and largest row count: added MiB per added row against the floor's."""
    for stage in STAGES[:3]:
        runs = sorted((r for r in results if r["stage"] == stage), key=lambda r: r["rows"])
        if len(runs) < 2:
            continue
        a, b = runs[0], runs[-1]
        rows = b["rows"] - a["rows"]
        floor = (b["floor_mib"] - a["floor_mib"]) * MIB / rows
        for key in ("peak_mib", "held_mib", "anon_peak_mib", "anon_held_mib"):
            grown = (b[key] - a[key]) * MIB / rows
            print(f"{stage}: {key[:-4]} grows {grown:.0f} B a row from {a['rows']:,} to {b['rows']:,} rows; "
                  f"floor {floor:.0f} B a row; ratio {grown / floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 50_000])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="hh")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["data", "train"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, model, data, out = args.child
        print(json.dumps(child(stage, args.shape, Path(model), Path(data), Path(out), args.steps)))
        return

    from mmpref.tiny_models import make_tiny_lm

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_lm(root / "lm", seed=0)
        for n in args.rows:
            data = root / f"rows-{n}" / f"rows{SHAPES[args.shape][2]}"  # a folder each: its own caches
            data.parent.mkdir()
            (write_ultrafeedback if args.shape == "ultrafeedback" else write_rows)(data, n)
            for stage in sorted(args.stages, key=STAGES.index):
                measured = measure(stage, args.shape, model, data, root / f"out-{n}-{stage}", args.steps)
                row = {"rows": n, "file_mib": data.stat().st_size / MIB, "stage": stage, **measured}
                results.append(row)
                print(json.dumps(row), flush=True)
    print_tables(results)


if __name__ == "__main__":
    main()
