"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard and wandb when asked for
(imported only then, so neither is a dependency)."""

from __future__ import annotations

import json
from pathlib import Path

from ...files import atomic_write_bytes
from ..errors import UserError

METRICS_NAME = "metrics.jsonl"


class RunLog:
    def __init__(self, out_dir: Path, cfg, resume_step: int = 0):
        self.path = Path(out_dir) / METRICS_NAME
        self.rows = self._kept_rows(resume_step)
        # Rewrite without rows logged after the checkpoint we resume from: they are logged again.
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = self._open_tensorboard(out_dir) if cfg.tensorboard else None
        self._wandb = self._open_wandb(cfg) if cfg.wandb else None

    def _kept_rows(self, resume_step: int) -> list[dict]:
        if resume_step == 0 or not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if r.get("step", 0) <= resume_step]

    @staticmethod
    def _open_tensorboard(out_dir):
        return _tensorboard_writer_class()(str(Path(out_dir) / "tensorboard"))

    @staticmethod
    def _open_wandb(cfg):
        return _wandb().init(project=cfg.wandb, config=cfg.to_dict(), dir=cfg.out, resume="allow")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def check_logging_extras(cfg) -> None:
    """Fail at start-up, not after harvesting, when --tensorboard / --wandb lack their package."""
    if cfg.tensorboard:
        _tensorboard_writer_class()
    if cfg.wandb:
        _wandb()


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from e
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError as e:
        raise UserError(f"--wandb needs the wandb package (pip install wandb): {e}") from e
    return wandb
