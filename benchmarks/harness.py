"""Timing, memory and reporting helpers shared by the benchmarks (no op-specific code)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TimingPlan:
    """How hard to measure: warm-up calls, then reps until `budget_s` is spent (clamped)."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


# Large enough to evict the H100's 50 MB L2 between reps, so that every rep reads from HBM.
_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _time_reps(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Wall time of each of `reps` calls in ms."""
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    flush = _flush_buffers[device]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        # Enqueued before the start event: it also keeps the GPU busy while the host
        # launches fn, so the events time the kernels rather than Python. No sync per rep.
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def time_once_ms(fn: Callable[[], object], device: torch.device) -> list[float]:
    """One call of fn, timed like a rep of measure_ms (no warm-up)."""
    return _time_reps(fn, device, 1)


def measure_ms(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> tuple[float, int]:
    """Median time of fn in ms and the number of timed reps."""
    for _ in range(plan.warmup):  # compilation, allocator and cache warm-up
        fn()
    samples = _time_reps(fn, device, 1)  # the first sample sizes the rest
    reps = int(min(plan.max_reps, max(plan.min_reps, plan.budget_s * 1e3 / max(samples[0], 1e-3))))
    samples += _time_reps(fn, device, reps - 1)
    return statistics.median(samples), len(samples)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory one call of fn allocates above what is live before it (None off CUDA:
    the CPU allocator keeps no peak statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def process_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux: VmRSS, VmHWM) in MiB; 0 if the field is missing."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def environment(device: torch.device) -> dict[str, object]:
    """What a reader needs to compare runs: device, torch, threads, date."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": _git_revision(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    """The commit measured, with -dirty when the tree (kernels included) had local changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# --- one table writer, for the terminal and for RESULTS.md alike (a padded Markdown table) ---

Column = tuple[str, str, int, str]  # (record key, header, width, format for numbers)


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def table_lines(columns: list[Column], records: list[dict[str, object]], header: bool = True) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.rjust(width) for cell, (_, _, width, _) in zip(cells, columns)) + " |"

    lines = []
    if header:
        lines.append(line([title for _, title, _, _ in columns]))
        lines.append("|" + "|".join("-" * (width + 1) + ":" for _, _, width, _ in columns) + "|")
    lines += [line([_cell(r.get(key), fmt) for key, _, _, fmt in columns]) for r in records]
    return lines


def report(title: str, env: dict[str, object], columns: list[Column], records: list[dict[str, object]]) -> str:
    """A markdown section: heading, environment, the command that made it, the table."""
    script = Path(sys.argv[0]).name
    return "\n".join(
        [
            f"### {title}",
            "",
            f"- torch {env['torch_version']}, {env['threads']} threads ({env['cpus']} CPUs), {env['date']}, git {env['git']}",
            f"- command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`",
            "",
            *table_lines(columns, records),
        ]
    )


def publish(records, columns, env, *, name: str, title: str, out_dir: Path, markdown: Path | None, section: str):
    """Write ``records`` to out_dir/<date>_<name>.jsonl and, given ``markdown``, rewrite its section."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_jsonl(out_dir / f"{stamp}_{name}.jsonl", records)
    if markdown:
        replace_section(markdown, section, report(title, env, columns, records))


def replace_section(path: Path, section: str, body: str) -> None:
    """Rewrite the text between `<!-- section:begin -->` and `<!-- section:end -->` in path
    (appending the section if the markers are missing), leaving the rest of the file alone."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
