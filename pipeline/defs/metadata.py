"""Turn tables and plots into Dagster metadata, and save the plots beside the data for people without the UI."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from pipeline.core.paths import DataPaths
from pipeline.core.report import markdown_table, png_markdown
from pipeline.core.store import atomic_write_bytes


def md_table(df: pd.DataFrame, max_rows: int = 30) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(df, max_rows=max_rows))


def plot(paths: DataPaths, name: str, png: bytes, alt: str) -> dg.MetadataValue:
    """Write ``reports/<name>`` and return it inline as Markdown."""
    atomic_write_bytes(paths.report(name), png)
    return dg.MetadataValue.md(png_markdown(png, alt) + f"\n\n`{paths.report(name)}`")


def progress_logger(context: dg.AssetExecutionContext, what: str, every: int = 1000):
    """A progress callback for long loops: logs at the start, each time ``every`` more items (or 10 %) are done,
    and at the end, however often the loop calls it."""
    last = [-1]

    def report(done: int, total: int) -> None:
        step = max(1, min(every, total // 10 or 1))
        if done == total or last[0] < 0 or done - last[0] >= step:
            last[0] = done
            context.log.info(f"{what}: {done}/{total}")

    return report
