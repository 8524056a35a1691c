"""``mmpref synth``: self-critique preference data from a teacher LM (rDPO, docs/design.md §8).

For each prompt the teacher, in one conversation (as in the rDPO authors' notebooks):

1. answers the prompt (wrapped in a jailbreak / persona template if configured);
2. is asked to critique its answer against the principle;
3. is asked to revise it.

The revision is ``chosen``, the first answer ``rejected``; the critique is kept in ``critique``.
Rows go to a JSON Lines file with an ``id`` per prompt, one flushed+fsynced line at a time, to
``<output>.partial`` until every prompt is done, then renamed to ``output`` (see
:mod:`mmpref.rdpo.jsonl`); a rerun skips what is done. Rows whose answer or revision is empty, or whose revision equals
the answer, are reported and written to ``<stem>.dropped.jsonl`` with a ``reason`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmpref.data import DataError
from mmpref.rdpo.config import SynthConfig
from mmpref.rdpo.generation import Generator, Messages, Prompt, assign_ids, chunks, derive_seed, read_prompts
from mmpref.rdpo.jsonl import PartialAppender, resume_rows

STAGES = ("answer", "critique", "revision")


@dataclass
class SynthReport:
    output: Path
    dropped_path: Path
    total: int  # prompts in the config
    skipped: int  # already done by an earlier run (kept or dropped)
    written: int  # new rows in output
    dropped_ids: list[str] = field(default_factory=list)  # new rows dropped by this run

    def summary(self) -> str:
        lines = [
            f"synth: {self.written} new rows written to {self.output} "
            f"({self.skipped} of {self.total} prompts already done, skipped)"
        ]
        if self.dropped_ids:
            shown = ", ".join(self.dropped_ids[:20]) + (" ..." if len(self.dropped_ids) > 20 else "")
            lines.append(
                f"synth: dropped {len(self.dropped_ids)} rows with an empty or unchanged "
                f"revision (see {self.dropped_path}): {shown}"
            )
        return "\n".join(lines)


def dropped_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.dropped.jsonl")


def fill(template: str, **values: str) -> str:
    """Replace the known ``{name}`` placeholders only, so templates may hold other braces (JSON, code)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def teacher_prompts(cfg: SynthConfig) -> list[Prompt]:
    """The configured prompts, each wrapped in its template (prompt i uses template i % n).

    A prompt without a given id is identified by a hash of the wrapped text, so editing a
    template makes new rows instead of silently reusing rows made with the old one.
    """
    wrapped = []
    for i, (given, text) in enumerate(read_prompts(cfg.prompts, cfg.prompts_file)):
        if not isinstance(text, str):
            raise DataError(f"prompt {given or i}: synth takes plain-text prompts, got chat messages")
        wrapped.append((given, fill(cfg.prompt_templates[i % len(cfg.prompt_templates)], prompt=text)))
    return assign_ids(wrapped)


def drop_reason(answer: str, revision: str) -> str | None:
    if not answer.strip():
        return "empty answer"
    if not revision.strip():
        return "empty revision"
    if revision.strip() == answer.strip():
        return "revision identical to the answer"
    return None


def synth_batch(
    teacher: Generator, batch: list[Prompt], cfg: SynthConfig, batch_seed: int
) -> list[dict[str, Any]]:
    """Answer, critique and revise every prompt of the batch: three batched ``generate`` calls."""
    convs: list[Messages] = [
        ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        + [{"role": "user", "content": p.text}]
        for p in batch
    ]
    outputs: dict[str, list[str]] = {}
    for stage_index, stage in enumerate(STAGES):
        if stage_index:  # the teacher's last reply, then the next request
            previous = outputs[STAGES[stage_index - 1]]
            template = cfg.critique_template if stage == "critique" else cfg.revision_template
            for k, conv in enumerate(convs):
                request = fill(
                    template,
                    principle=cfg.principle,
                    prompt=batch[k].text,
                    answer=outputs["answer"][k],
                    critique=outputs.get("critique", [""] * len(batch))[k],
                )
                conv += [{"role": "assistant", "content": previous[k]}, {"role": "user", "content": request}]
        texts = [teacher.render_chat(conv) for conv in convs]
        seed = derive_seed(batch_seed, stage_index)
        outputs[stage] = teacher.generate(
            texts, cfg.generation, seed=seed, add_special_tokens=not teacher.has_chat_template
        )
    rows = []
    for k, p in enumerate(batch):
        prompt: str | Messages = (
            [{"role": "user", "content": p.text}] if cfg.prompt_format == "chat" else p.text
        )
        rows.append(
            {
                "id": p.id,
                "prompt": prompt,
                "chosen": outputs["revision"][k],
                "rejected": outputs["answer"][k],
                "critique": outputs["critique"][k],
            }
        )
    return rows


def run_synth(cfg: SynthConfig, *, progress: bool = True) -> SynthReport:
    """Generate every prompt not yet in ``cfg.output`` (or its dropped file); returns what happened."""
    prompts = teacher_prompts(cfg)
    output, dropped = Path(cfg.output), dropped_path_for(cfg.output)
    done = {str(row["id"]) for path in (output, dropped) for row in resume_rows(path)}
    position = {p.id: i for i, p in enumerate(prompts)}
    todo = [p for p in prompts if p.id not in done]
    report = SynthReport(output, dropped, total=len(prompts), skipped=len(prompts) - len(todo), written=0)
    kept, rejected = PartialAppender(output), PartialAppender(dropped)
    if not todo:  # an earlier run wrote every row but stopped before renaming
        kept.commit()
        rejected.commit()
        return report
    teacher = Generator(
        cfg.teacher, device=cfg.device, torch_dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code
    )
    bar = tqdm(total=len(prompts), initial=report.skipped, desc="synth", unit="prompt", disable=not progress)
    with kept, rejected, bar:  # an exception closes the .partial files without renaming them
        for batch in chunks(todo, cfg.generation.batch_size):
            seed = derive_seed(cfg.generation.seed, position[batch[0].id])
            for row in synth_batch(teacher, batch, cfg, seed):
                reason = drop_reason(row["rejected"], row["chosen"])
                if reason is None:
                    kept.write(row)
                else:
                    rejected.write({**row, "reason": reason})
                    report.dropped_ids.append(row["id"])
            bar.update(len(batch))
    kept.commit()
    rejected.commit()
    report.written = kept.count
    return report
