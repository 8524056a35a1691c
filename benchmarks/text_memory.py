"""Peak memory of a few optimizer steps on text: mmpref DPO / RPO vs TRL's DPOTrainer, each in a fresh process.

The companion of ``text_step.py`` (steps/s): the same model builder, rows and contenders, imported from it,
so both sides are configured exactly as there (same saved model folder, same rows in the same order, same
batch, fp32, reference log-probs precomputed on both sides, no gradient checkpointing, AdamW; see
``text_step.mmpref_runner`` and ``text_step.trl_runner``). Here every contender runs in a process of its
own (this script re-invokes itself with ``--contender NAME --shapes NAME``), for ``--steps`` optimizer
steps (default 2), and reports:

* ``peak``: the process's peak resident set size over its whole life (loading the model, tokenizing,
  the reference pass, the steps), i.e. the high-water mark ``VmHWM`` / ``ru_maxrss`` that the kernel
  keeps, not a sampled value;
* ``steps peak``: the same high-water mark over the optimizer steps alone (reset through
  ``/proc/self/clear_refs`` right before the first step), and ``before``: the RSS at that moment;
* ``start``: the RSS once Python and torch are imported, before the contender's own imports (a floor);
* on a GPU (``--device cuda``, the default where CUDA is available): ``torch.cuda.max_memory_allocated()``
  over the process and over the steps, both sides on the GPU.

Shape sets:

* ``current``: ``text_step.py``'s defaults (Llama layout, hidden 256, 4 layers, untied 32k vocabulary,
  prompts of 64–384 tokens, responses of 16–128, batch 4);
* ``long``: a Qwen2.5-sized *tied* vocabulary (151,936, ``tie_word_embeddings=True``), hidden 256,
  2 layers, prompts of 256–512 tokens, chosen and rejected answers of 512–1,024 tokens each, batch 2.
  The word-level tokenizer has 151,936 entries too, so the token ids span the whole vocabulary.

The mmpref side goes through mmpref's own objects (``TextTask``, ``task.rows``, ``Objective``,
``build_optimizer``) exactly as ``text_step.py`` does, so a change to how mmpref computes log-probs (a
chunked LM head) shows up here. Run from the repository root:

    python benchmarks/text_memory.py                    # both shape sets (several minutes on 2 CPU cores)
    python benchmarks/text_memory.py --shapes long --contenders mmpref-dpo trl-dpo
    python benchmarks/text_memory.py --quick            # tiny shapes, a smoke run (~1 min: mostly imports)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_step import (
    LONG,
    QUICK,
    Shapes,
    build_model_folder,
    make_rows,
    mmpref_runner,
    trl_runner,
    write_jsonl,
)

CONTENDERS = ("mmpref-dpo", "mmpref-rpo", "trl-dpo")
SHAPE_SETS = ("current", "long")
GIB = 2**30


def shapes_for(name: str, quick: bool) -> Shapes:
    if name == "current":
        return Shapes(**asdict(QUICK)) if quick else Shapes()
    if name == "long":
        if quick:  # tiny, but keeps the long set's proportions: tied head, answers longer than prompts
            return Shapes(batch_size=2, hidden=64, layers=2, heads=2, vocab=4000, prompt_min=8, prompt_max=16,
                          response_min=16, response_max=32, words=3997, tied=True)  # fmt: skip
        return Shapes(**asdict(LONG))
    raise ValueError(f"shape set: {name!r}")


# ---------------------------------------------------------------------------------------------- setup


def batch_layout(rows: list[dict[str, str]], b: int) -> dict[str, int]:
    """Largest batch: answer tokens (the rows of mmpref's LM head) and padded positions (TRL's).

    The tokenizer is word-level, so a row's token counts are its word counts (the EOS word included)."""
    answers, padded = [], []
    for i in range(len(rows) // b):
        batch = [
            [len(r[k].split()) for k in ("prompt", "chosen", "rejected")] for r in rows[i * b : (i + 1) * b]
        ]
        answers.append(sum(c + r for _, c, r in batch))
        padded.append(2 * b * max(p + max(c, r) for p, c, r in batch))
    return {"max_answer_tokens_per_batch": max(answers), "max_padded_positions_per_batch": max(padded)}


def check_model_folder(folder: Path, shapes: Shapes) -> dict:
    """Load the folder as both sides do (AutoModelForCausalLM, fp32) and check vocabulary and tying."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr()
    if tied != shapes.tied or head.shape[0] != shapes.vocab:
        raise AssertionError(
            f"model folder: tied={tied}, vocab={head.shape[0]}; wanted {shapes.tied}, {shapes.vocab}"
        )
    info = {"parameters": sum(p.numel() for p in model.parameters()), "tied": tied,
            "tokenizer_size": len(AutoTokenizer.from_pretrained(folder))}  # fmt: skip
    del model
    return info


# ---------------------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_gib() -> float:
    """The process's resident high-water mark since it started or since :func:`reset_peak_rss` (``VmHWM``).

    ``ru_maxrss`` (KiB on Linux) is the same counter for a live process, but also keeps the high-water mark
    of threads that have exited, which survives a reset; it is checked against the lifetime peak only."""
    return _status_kib("VmHWM") / 2**20


def lifetime_peak_rss_gib() -> float:
    return max(_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def rss_gib() -> float:
    return _status_kib("VmRSS") / 2**20


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rows_digest(tokenized) -> str:
    return hashlib.sha256(
        json.dumps([[list(p), [list(r) for r in rs]] for p, rs in tokenized]).encode()
    ).hexdigest()[:16]


def trl_on_gpu() -> None:
    """``text_step.trl_runner`` sets ``use_cpu=True`` (a CPU benchmark); on a GPU, TRL must run there too.

    trl_runner imports ``DPOConfig`` from ``trl`` when called, so this subclass, which drops the flag,
    is what it builds; every other setting stays as trl_runner has it."""
    import trl

    class DPOConfigOnGPU(trl.DPOConfig):
        def __init__(self, *a, **kw):
            kw["use_cpu"] = False
            super().__init__(*a, **kw)

    trl.DPOConfig = DPOConfigOnGPU


def child(args: argparse.Namespace) -> dict:
    """One contender in this (fresh) process: set up (untimed reference pass included), then the steps."""
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    torch.manual_seed(args.seed)
    cuda = args.device == "cuda"
    if cuda and args.contender == "trl-dpo":
        trl_on_gpu()

    shapes = shapes_for(args.shapes, args.quick)
    work = Path(args.workdir)
    model_dir, data_file, out_dir = work / "model", work / "train.jsonl", work / f"out-{args.contender}"
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    rss_start = rss_gib()
    start = time.perf_counter()
    if args.contender == "trl-dpo":
        run, tokenized = trl_runner(model_dir, rows, out_dir, shapes, args.steps, args.seed)
        # trl_runner times from the end of a first step: run(1, n - 1) is n optimizer steps in all
        window = (1, args.steps - 1)
    else:
        loss = "sigmoid" if args.contender == "mmpref-dpo" else "rpo"
        run, mm_rows = mmpref_runner(model_dir, data_file, out_dir, shapes, loss, args.steps, args.seed)
        tokenized = [(r.prompt, r.responses) for r in mm_rows]
        window = (0, args.steps)
    setup_s = time.perf_counter() - start
    setup_peak, before = lifetime_peak_rss_gib(), rss_gib()
    if cuda:
        torch.cuda.synchronize()
        cuda_setup_peak = torch.cuda.max_memory_allocated() / GIB
        cuda_before = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    start = time.perf_counter()
    step_times = run(*window)
    if cuda:
        torch.cuda.synchronize()
    steps_s = time.perf_counter() - start
    steps_peak = peak_rss_gib() if reset else float("nan")
    result = {
        "contender": args.contender,
        "shapes": args.shapes,
        "steps": args.steps,
        "peak_rss_gib": max(setup_peak, lifetime_peak_rss_gib()),
        "steps_peak_rss_gib": steps_peak,
        "rss_before_steps_gib": before,
        "rss_at_start_gib": rss_start,
        "setup_seconds": setup_s,
        "steps_seconds": steps_s,
        "step_seconds": step_times,  # trl-dpo: steps 2.. only (timed between its step-end callbacks)
        "rows_digest": rows_digest(tokenized),
        "torch_threads": torch.get_num_threads(),
    }
    if args.contender != "trl-dpo":  # which mmpref was measured (a checkout, or an older copy on PYTHONPATH)
        import mmpref

        result["mmpref_path"] = str(Path(mmpref.__file__).parent)
    if cuda:
        result.update({
            "cuda_peak_gib": max(cuda_setup_peak, torch.cuda.max_memory_allocated() / GIB),
            "cuda_steps_peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "cuda_before_steps_gib": cuda_before,
        })  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, contender: str, shape_set: str, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--contender", contender, "--shapes", shape_set,
           "--steps", str(args.steps), "--seed", str(args.seed), "--device", args.device, "--workdir", str(work)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # trl_runner is CPU-only: keep mmpref's Accelerator on the CPU too
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"{contender} on {shape_set} failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def ratios_of(results: dict[str, dict], key: str) -> dict[str, float]:
    out = {}
    if "trl-dpo" in results:
        for name in ("mmpref-dpo", "mmpref-rpo"):
            if name in results:
                out[f"{name} / trl-dpo"] = results[name][key] / results["trl-dpo"][key]
    return out


def report(name: str, shapes: Shapes, info: dict, results: dict[str, dict], device: str) -> dict:
    print()
    print(f"== {name}: {asdict(shapes)} (intermediate {shapes.intermediate}); model: {info}")
    cols = [
        ("peak", "peak_rss_gib"),
        ("steps peak", "steps_peak_rss_gib"),
        ("before", "rss_before_steps_gib"),
        ("start", "rss_at_start_gib"),
    ]
    if device == "cuda":
        cols += [("cuda peak", "cuda_peak_gib"), ("cuda steps", "cuda_steps_peak_gib")]
    head = (
        f"{'contender':<11} "
        + " ".join(f"{c:>10}" for c, _ in cols)
        + f" {'steps':>5} {'steps s':>8} {'setup s':>8} {'process s':>9}"
    )
    print(head + "   (GiB: host RSS high-water mark" + (", CUDA allocated" if device == "cuda" else "") + ")")
    print("-" * len(head))
    for contender, r in results.items():
        print(f"{contender:<11} " + " ".join(f"{r[k]:10.2f}" for _, k in cols)
              + f" {r['steps']:5d} {r['steps_seconds']:8.1f} {r['setup_seconds']:8.1f} {r['process_seconds']:9.1f}")  # fmt: skip
    ratios = {
        k: ratios_of(results, k) for _, k in cols if k not in ("rss_before_steps_gib", "rss_at_start_gib")
    }
    for key, rs in ratios.items():
        for label, v in rs.items():
            print(f"ratio {label:<22} {key:<20} {v:6.3f}")
    return {"shapes": asdict(shapes), "model": info, "results": results, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=(*SHAPE_SETS, "both"), default="both")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # child: the one to run
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per contender (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each child (default: torch's choice; 1 with --quick)")  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default): cuda where available, else cpu; cuda: both sides on the GPU, and "
                         "torch.cuda.max_memory_allocated is reported besides host RSS")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child and (args.contender is None or args.shapes == "both" or args.workdir is None):
        ap.error("--child needs --contender, one --shapes set and --workdir")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return None

    from text_step import environment

    load_start = os.getloadavg()[0]
    sets = SHAPE_SETS if args.shapes == "both" else (args.shapes,)
    out: dict = {"device": args.device, "steps": args.steps, "quick": args.quick, "shape_sets": {}}
    with tempfile.TemporaryDirectory(prefix="mmpref-mem-") as tmp:
        for name in sets:
            shapes = shapes_for(name, args.quick)
            work = Path(tmp) / name
            work.mkdir()
            build_model_folder(work / "model", shapes, args.seed)
            info = check_model_folder(work / "model", shapes)
            rows = make_rows(args.steps * shapes.batch_size, shapes, args.seed)
            write_jsonl(rows, work / "train.jsonl")
            info.update(batch_layout(rows, shapes.batch_size))
            results: dict[str, dict] = {}
            for contender in args.contenders:
                print(f"{name}: {contender} (fresh process) ...", flush=True)
                results[contender] = r = run_child(args, contender, name, work)
                print(f"{name}: {contender}: peak {r['peak_rss_gib']:.2f} GiB, steps peak "
                      f"{r['steps_peak_rss_gib']:.2f} GiB, {r['process_seconds']:.0f} s", flush=True)  # fmt: skip
            if len({r["rows_digest"] for r in results.values()}) > 1:  # same token ids on every side
                raise AssertionError(f"{name}: the contenders tokenized the rows differently")
            out["shape_sets"][name] = report(name, shapes, info, results, args.device)
    env = environment(load_start)
    env["device"] = args.device
    threads = {r["torch_threads"] for s in out["shape_sets"].values() for r in s["results"].values()}
    env["torch_threads"] = threads.pop() if len(threads) == 1 else sorted(threads)
    out["environment"] = env
    print("\nenvironment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
