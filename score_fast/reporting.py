"""Where a run's metrics go (train.report_to): any of

  jsonl        run_dir/metrics.jsonl, one JSON object a logged step (every key, nested ones
               too); samples in run_dir/samples.jsonl
  tensorboard  run_dir/tensorboard/ (torch's SummaryWriter): every number as a scalar
               ("time/policy_s" lands in the "time" section), samples as a markdown table
  wandb        a wandb run in run_dir/wandb/, offline unless WANDB_MODE says otherwise (no
               network needed; `wandb sync` uploads it later); samples as a wandb.Table

Only the main rank reports. tensorboard and wandb are optional extras, imported when chosen:
a missing one is an error when the run starts, not after its first step.
"""
from __future__ import annotations

import json
import math
import os

__all__ = ["BACKENDS", "Reporter", "sample_rows"]

BACKENDS = ("jsonl", "tensorboard", "wandb")
SAMPLE_COLUMNS = ("step", "problem", "attempt1", "attempt2", "r1", "r2")


def sample_rows(step: int, problems, episodes, r1, r2, n: int) -> list[dict]:
    """The first n episodes of a step as table rows (problem, both attempts, rewards).
    r2=None (train.single_turn: no attempt 2 was sampled): no attempt2 and r2 columns."""
    if r2 is None:
        return [{"step": step, "problem": p, "attempt1": e.text1, "r1": float(a)}
                for p, e, a in list(zip(problems, episodes, r1))[:n]]
    return [dict(zip(SAMPLE_COLUMNS, (step, p, e.text1, e.text2, float(a), float(b))))
            for p, e, a, b in list(zip(problems, episodes, r1, r2))[:n]]


def _numbers(metrics: dict):
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            yield k, float(v)


class Reporter:
    """The chosen backends, opened at the first log (a Trainer that never steps leaves no
    files) and closed by close() (the end of the run); the imports are checked at once."""

    def __init__(self, backends, run_dir: str, config: dict | None = None,
                 enabled: bool = True):
        self.backends, self.run_dir, self.config = list(backends), run_dir, config
        self.enabled = enabled
        self._jsonl = self._samples = self._tb = self._wandb = None
        self.opened = False
        if "tensorboard" in self.backends:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as e:
                raise ImportError("train.report_to has tensorboard: pip install tensorboard "
                                  "(or the project's [tensorboard] extra)") from e
        if "wandb" in self.backends:
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise ImportError("train.report_to has wandb: pip install wandb (or the "
                                  "project's [wandb] extra)") from e

    def _open(self) -> None:
        self.opened = True
        if "jsonl" in self.backends:
            self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        if "wandb" in self.backends:
            import wandb
            self._wandb_mod = wandb
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "score_fast"),
                                     dir=self.run_dir, config=self.config,
                                     mode=os.environ.get("WANDB_MODE", "offline"),
                                     name=os.path.basename(os.path.normpath(self.run_dir)))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if not self.opened:
            self._open()
        if self._jsonl:
            self._jsonl.write(json.dumps(metrics) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in _numbers(metrics):
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(dict(_numbers(metrics)), step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if not (self.enabled and rows):
            return
        if not self.opened:
            self._open()
        if "jsonl" in self.backends:
            if self._samples is None:
                self._samples = open(os.path.join(self.run_dir, "samples.jsonl"), "a")
            self._samples.writelines(json.dumps(r) + "\n" for r in rows)
            self._samples.flush()
        columns = [c for c in SAMPLE_COLUMNS if c in rows[0]]  # single_turn: no attempt 2
        if self._tb:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
            self._tb.add_text("samples", "\n".join(table), step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log({"samples": self._wandb_mod.Table(
                columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def close(self) -> None:
        for f in (self._jsonl, self._samples):
            if f:
                f.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        self._jsonl = self._samples = self._tb = self._wandb = None
        self.opened = False
