"""Readable summaries of a training run (plain pandas, no torch: the Dagster code location imports this)."""

from __future__ import annotations

import pandas as pd

# Accuracy thresholds (km) of every error summary: training logs, validation and the evaluation report.
ACC_KM = (1, 25, 200, 750)


def baseline_comparison(summary: dict) -> pd.DataFrame:
    """The final model's end-to-end validation numbers next to the majority baselines (and the oracle, labelled)."""
    f, b = summary.get("final", {}), summary.get("baselines", {})
    rows = [
        ("province accuracy", f.get("val_province_acc"), b.get("majority_province_acc"), "most frequent province"),
        ("cell accuracy", f.get("val_cell_acc"), b.get("majority_cell_acc"), "most frequent cell"),
        ("median error km (mixture)", f.get("val_median_km"), b.get("majority_cell_centre_median_km"),
         "centre of the most frequent cell"),
        ("mean error km (mixture)", f.get("val_mean_km"), b.get("majority_cell_centre_mean_km"),
         "centre of the most frequent cell"),
        ("p90 error km (mixture)", f.get("val_p90_km"), b.get("majority_cell_centre_p90_km"),
         "centre of the most frequent cell"),
        ("acc@25km (mixture)", f.get("val_acc_25km"), b.get("majority_cell_centre_acc_25km"),
         "centre of the most frequent cell"),
        ("ORACLE median km (true cell + offset; not end-to-end)", f.get("oracle_val_median_km"), None, "-"),
    ]
    return pd.DataFrame(rows, columns=["metric (val)", "model", "baseline", "baseline is"])


def beats_baselines(summary: dict) -> bool:
    f, b = summary.get("final", {}), summary.get("baselines", {})
    try:
        return bool(f["val_province_acc"] > b["majority_province_acc"] and f["val_cell_acc"] > b["majority_cell_acc"])
    except KeyError:
        return False
