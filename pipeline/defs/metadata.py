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
    """A progress callback for long loops: logs every ``every`` items and at the end."""

    def report(done: int, total: int) -> None:
        if done == total or done % every < 500 or done == 1:
            context.log.info(f"{what}: {done}/{total}")

    return report
