"""Assemble BENCHMARKS.md from the results_*.md files that the benchmark scripts write.

Usage: .venv/bin/python benchmarks/collect_results.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = (
    "results_engine.md",
    "results_store_build.md",
    "results_gradients.md",
    "results_mislabel.md",
    "results_factors.md",
    "results_generation.md",
    "results_distributed.md",
    "results_redesign.md",
    "results_scale.md",
    "results_sd.md",
    "results_lds.md",
    "results_finetuner.md",
    "results_paper.md",
)

HEADER = """# Benchmarks

Measured on this project's development machine: 2 CPU cores, 24 GiB, no GPU, torch 2.13.0 (CPU).
Every speed figure is a ratio against a baseline run in the same process, because these machines are
noisy (other work shared the 2 cores during some runs: absolute seconds vary by 2-3x between runs).
Each section names the command that produced it; `benchmarks/collect_results.py` assembles this file.
Sign convention wherever scores appear: positive influence = harmful.
"""


def main() -> None:
    sections = [HEADER]
    for name in PARTS:
        path = HERE / name
        sections.append(path.read_text().strip() if path.is_file() else f"## {name}\n\nNot measured yet.")
    (HERE.parent / "BENCHMARKS.md").write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
