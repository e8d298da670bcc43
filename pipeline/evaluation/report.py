"""The evaluation report people read: end-to-end numbers on the location-disjoint test split, the oracle figure
beside them (labelled as such), baselines, plots, as Markdown, HTML (plots embedded) and Dagster metadata.

Input is one row per test image with the truth and every method's prediction (see ``EVAL_COLUMNS``); the numbers
are computed here, the predictions come from ``geopak_model``'s predictor.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from geopak_model.report import ACC_KM
from pipeline.core.gazetteer import haversine_km
from pipeline.core.provinces import PROVINCES
from pipeline.core.report import PROVINCE_COLOURS, column_floatfmt, draw_outlines, markdown_table, png_bytes
from pipeline.core.store import atomic_write_bytes
from pipeline.labels.dates import circular_day_difference

# method column prefix -> label in the report; the oracle is never the headline
METHODS: dict[str, str] = {
    "pred": "GeoPak end to end (+ retrieval refinement)",
    "classifier": "GeoPak without refinement (geometric median)",
    "top1": "GeoPak, most probable hypothesis only",
    "mean": "GeoPak, weighted mean (GEOPAK's inference)",
    "aux": "GeoPak's auxiliary lat/lon head alone",
    "province_median": "baseline: predicted province's median training point",
    "knn": "baseline: nearest training image (kNN on frozen features)",
    "majority": "baseline: training set's majority cell centre",
    "oracle": "ORACLE: true cell + predicted offset (not achievable)",
}
BASELINES = ("province_median", "knn", "majority")  # what GeoPak must beat (the oracle is not a baseline)
EVAL_COLUMNS = (
    "image_id", "lat", "lon", "province_id", "cell_id", "koppen_id", "koppen_group", "day_of_year",
    "pred_lat", "pred_lon", "pred_province_id", "pred_cell_top5", "pred_koppen_id", "pred_koppen_group",
    "pred_day_of_year",
)


@dataclass
class EvaluationReport:
    headline: pd.DataFrame
    provinces: pd.DataFrame
    confusion: pd.DataFrame
    other: pd.DataFrame
    errors: dict[str, np.ndarray]
    n_images: int
    plots: dict[str, bytes] = field(default_factory=dict)

    def metric(self, method: str, column: str) -> float:
        return float(self.headline.set_index("method_key").loc[method, column])


def _error_row(key: str, err: np.ndarray) -> dict:
    return {
        "method_key": key,
        "method": METHODS[key],
        "median_km": float(np.median(err)),
        "mean_km": float(np.mean(err)),
        "p90_km": float(np.percentile(err, 90)),
        **{f"acc_{k}km": float(np.mean(err <= k)) for k in ACC_KM},
    }


def evaluate(df: pd.DataFrame) -> EvaluationReport:
    """Every metric of the report from the per-image predictions (columns ``EVAL_COLUMNS`` + method columns)."""
    if df.empty:
        raise ValueError("no test images to evaluate")
    errors = {}
    for key in METHODS:
        if f"{key}_lat" in df.columns and df[f"{key}_lat"].notna().all():
            errors[key] = haversine_km(df["lat"], df["lon"], df[f"{key}_lat"], df[f"{key}_lon"])
    headline = pd.DataFrame([_error_row(k, e) for k, e in errors.items()])

    true_p = df["province_id"].to_numpy()
    pred_p = df["pred_province_id"].to_numpy()
    rows = []
    for p in PROVINCES:
        m = true_p == p.id
        if m.any():
            rows.append({"province": p.name, "test_images": int(m.sum()), "province_acc": float(np.mean(pred_p[m] == p.id)),
                         "median_km": float(np.median(errors["pred"][m])), "acc_25km": float(np.mean(errors["pred"][m] <= 25))})
    provinces = pd.DataFrame(rows)
    confusion = pd.crosstab(
        pd.Categorical([PROVINCES[i].key for i in true_p], categories=[p.key for p in PROVINCES]),
        pd.Categorical([PROVINCES[i].key for i in pred_p], categories=[p.key for p in PROVINCES]),
        rownames=["true"], colnames=["predicted"], dropna=False,
    )
    top5 = df["pred_cell_top5"].apply(lambda v: list(v) if v is not None else [])
    cell_top1 = np.mean([bool(t) and t[0] == c for t, c in zip(top5, df["cell_id"])])
    cell_top5 = np.mean([c in t for t, c in zip(top5, df["cell_id"])])

    def macro(pred: np.ndarray) -> float:
        return float(np.mean([np.mean(pred[true_p == p.id] == p.id) for p in PROVINCES if (true_p == p.id).any()]))

    def col(name: str, default=np.nan) -> np.ndarray:
        return df[name].to_numpy() if name in df.columns else np.full(len(df), default)

    maj_p = col("majority_province_id", -1)
    maj_cells = df["majority_cells_top5"].apply(list) if "majority_cells_top5" in df.columns else None
    raw_p = col("pred_province_uncorrected_id", -1)
    other = [
        ("province accuracy (prior correction on)", float(np.mean(pred_p == true_p)), float(np.mean(maj_p == true_p))),
        ("province accuracy (prior correction off)", float(np.mean(raw_p == true_p)), float(np.mean(maj_p == true_p))),
        ("province accuracy, macro average over provinces (correction on)", macro(pred_p), macro(maj_p)),
        ("province accuracy, macro average over provinces (correction off)", macro(raw_p), macro(maj_p)),
        ("cell top-1 accuracy", float(cell_top1),
         float(np.mean([bool(m) and m[0] == c for m, c in zip(maj_cells, df["cell_id"])])) if maj_cells is not None
         else np.nan),
        ("cell top-5 accuracy", float(cell_top5),
         float(np.mean([c in m for m, c in zip(maj_cells, df["cell_id"])])) if maj_cells is not None else np.nan),
        ("Köppen fine class accuracy", float(np.mean(df["pred_koppen_id"] == df["koppen_id"])),
         float(np.mean(col("majority_koppen_id", -1) == df["koppen_id"].to_numpy()))),
        ("Köppen coarse group accuracy", float(np.mean(df["pred_koppen_group"] == df["koppen_group"])),
         float(np.mean(col("majority_koppen_group", -1) == df["koppen_group"].to_numpy()))),
    ]
    known = df["day_of_year"].notna() & df["pred_day_of_year"].notna()
    if known.any():
        truth = df.loc[known, "day_of_year"].astype(float)
        mae = circular_day_difference(truth, df.loc[known, "pred_day_of_year"])
        base = df.loc[known, "majority_day_of_year"].astype(float) if "majority_day_of_year" in df.columns else None
        other.append(("day of year, mean absolute error (days, circular; lower is better)", float(np.mean(mae)),
                      float(np.mean(circular_day_difference(truth, base))) if base is not None and base.notna().all()
                      else np.nan))
    return EvaluationReport(
        headline=headline,
        provinces=provinces,
        confusion=confusion,
        other=pd.DataFrame(other, columns=["metric", "GeoPak", "majority baseline"]),
        errors=errors,
        n_images=len(df),
    )


def make_plots(rep: EvaluationReport, df: pd.DataFrame, outlines: dict | None = None) -> dict[str, bytes]:
    """Error CDF, per-province accuracy bars, and a map of test points coloured by error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, err in rep.errors.items():
        xs = np.sort(np.maximum(err, 0.01))
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=METHODS[key], linestyle="--" if key == "oracle" else "-")
    for k in ACC_KM:
        ax.axvline(k, color="#bbbbbb", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("great-circle error (km, log scale)")
    ax.set_ylabel("share of test images")
    ax.set_title("Error CDF on the test split")
    ax.legend(fontsize=7)
    plots["error_cdf.png"] = png_bytes(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    colour_of = {p.name: PROVINCE_COLOURS[p.id] for p in PROVINCES}
    ax.bar(rep.provinces["province"], rep.provinces["province_acc"], color=[colour_of[n] for n in rep.provinces["province"]])
    for i, (acc, n) in enumerate(zip(rep.provinces["province_acc"], rep.provinces["test_images"])):
        ax.text(i, acc + 0.01, f"{acc:.0%}\nn={n}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("province accuracy")
    ax.set_title("Province accuracy per province (test split)")
    fig.autofmt_xdate(rotation=25)
    plots["province_accuracy.png"] = png_bytes(fig)

    fig, ax = plt.subplots(figsize=(6.5, 6))
    draw_outlines(ax, outlines)
    sc = ax.scatter(df["lon"], df["lat"], c=np.log10(np.maximum(rep.errors["pred"], 0.1)), s=6, cmap="viridis_r")
    cb = fig.colorbar(sc, ax=ax, shrink=0.7)
    cb.set_label("log10 error (km)")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("Test images coloured by end-to-end error")
    plots["error_map.png"] = png_bytes(fig)
    rep.plots = plots
    return plots


def baseline_verdict(rep: EvaluationReport, method: str = "pred") -> dict:
    """Does ``method`` beat every baseline present on the median error (lower) and the share within 25 km
    (higher)? With a Markdown table of the comparison."""
    rows, passed = [], True
    for b in BASELINES:
        if b not in rep.errors:
            continue
        med_ok = rep.metric(method, "median_km") < rep.metric(b, "median_km")
        acc_ok = rep.metric(method, "acc_25km") > rep.metric(b, "acc_25km")
        passed &= med_ok and acc_ok
        rows.append({"baseline": METHODS[b], "baseline median km": rep.metric(b, "median_km"),
                     "GeoPak median km": rep.metric(method, "median_km"), "median beaten": med_ok,
                     "baseline ≤25 km %": 100 * rep.metric(b, "acc_25km"),
                     "GeoPak ≤25 km %": 100 * rep.metric(method, "acc_25km"), "≤25 km beaten": acc_ok})
    return {"passed": passed and bool(rows), "table": markdown_table(pd.DataFrame(rows), floatfmt="{:.1f}")}


def headline_table(rep: EvaluationReport) -> pd.DataFrame:
    t = rep.headline.drop(columns=["method_key"]).copy()
    for k in ACC_KM:
        t[f"acc_{k}km"] = (t[f"acc_{k}km"] * 100).round(1)
    return t.rename(columns={f"acc_{k}km": f"≤{k} km (%)" for k in ACC_KM})


def to_markdown(rep: EvaluationReport, title: str, notes: list[str], plot_links: bool = True) -> str:
    parts = [f"# {title}", "", *[f"- {n}" for n in notes], "",
             f"Test images: **{rep.n_images}** (location- and owner-disjoint test split).", "",
             "## Distance errors", "", markdown_table(headline_table(rep), floatfmt="{:.1f}"), "",
             "## Classification", "", markdown_table(rep.other), "",
             "## Per province", "", markdown_table(rep.provinces), "",
             "## Province confusion (rows: true, columns: predicted)", "",
             markdown_table(rep.confusion.reset_index()), ""]
    if plot_links:
        parts += ["## Plots", "", *[f"![{name}]({name})" for name in rep.plots], ""]
    return "\n".join(parts)


def to_html(rep: EvaluationReport, title: str, notes: list[str]) -> str:
    def table(df: pd.DataFrame) -> str:
        # km to 0.1, % to 0.1, shares to 3 digits: the same rule as the Markdown tables
        fmts = {c: column_floatfmt(c).format for c in df.columns if pd.api.types.is_float_dtype(df[c])}
        return df.to_html(index=False, formatters=fmts, border=0, classes="t")

    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
        f"<figcaption>{html.escape(n)}</figcaption></figure>" for n, b in rep.plots.items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} .t td,.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
figure{{display:inline-block;margin:8px}} img{{max-width:520px}}</style></head><body>
<h1>{html.escape(title)}</h1><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
<p>Test images: <b>{rep.n_images}</b> (location- and owner-disjoint test split).</p>
<h2>Distance errors</h2>{table(headline_table(rep))}
<h2>Classification</h2>{table(rep.other)}
<h2>Per province</h2>{table(rep.provinces)}
<h2>Province confusion (rows: true, columns: predicted)</h2>{rep.confusion.to_html(border=0, classes="t")}
<h2>Plots</h2>{imgs}</body></html>"""


def write_report(rep: EvaluationReport, out_dir: Path, title: str, notes: list[str]) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into ``out_dir`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in rep.plots.items():
        paths[name] = atomic_write_bytes(out_dir / name, png)
    paths["report.md"] = atomic_write_bytes(out_dir / "report.md", to_markdown(rep, title, notes).encode())
    paths["report.html"] = atomic_write_bytes(out_dir / "report.html", to_html(rep, title, notes).encode())
    return paths


def test_predictions(
    predictor, test: pd.DataFrame, train: pd.DataFrame, image_path, batch_size: int = 32, progress=None,
    top_provinces: int | None = None, top_cells: int | None = None,
    knn: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run the predictor over the test rows; return the per-image frame ``evaluate`` takes and the unreadable ones.

    ``test``/``train`` carry the labelled columns plus ``cell_id`` (and the cells' centres for the majority
    baseline: ``center_lat``/``center_lon`` of the training set's most frequent cell). ``knn``: the kNN
    baseline's (lat, lon) per test row (``baselines.knn_locations``), if computed. Every baseline comes from the
    training split alone.
    """
    from geopak_model.predictor import ImageLoadError
    from pipeline.evaluation.baselines import majority_answers, province_medians

    majority = train["cell_id"].value_counts().idxmax()
    mrow = train.loc[train["cell_id"] == majority].iloc[0]
    medians = province_medians(train)
    answers = majority_answers(train)
    knn_of = dict(zip(test["image_id"], zip(*knn))) if knn is not None else {}
    rows, failed = [], []
    keys = [pp.key for pp in PROVINCES]
    records = test.to_dict("records")
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        try:
            preds = predictor.predict([image_path(r["path"]) for r in chunk], top_provinces, top_cells, batch_size,
                                      oracle_cells=[int(r["cell_id"]) for r in chunk])
        except ImageLoadError:  # find the broken ones, keep the rest
            preds = []
            for r in chunk:
                try:
                    preds.append(predictor.predict(image_path(r["path"]), top_provinces, top_cells,
                                                   oracle_cells=[int(r["cell_id"])]))
                except ImageLoadError as exc:
                    failed.append({"image_id": r["image_id"], "error": str(exc)})
                    preds.append(None)
        for r, p in zip(chunk, preds):
            if p is None:
                continue
            top = p["hypotheses"][0] if p["hypotheses"] else {"lat": p["lat"], "lon": p["lon"]}
            pid = keys.index(p["province"])
            extra = {"classifier_lat": p["classifier_lat"], "classifier_lon": p["classifier_lon"]}
            if knn is not None:
                extra["knn_lat"], extra["knn_lon"] = knn_of[r["image_id"]]
            rows.append({
                **{k: r.get(k) for k in ("image_id", "lat", "lon", "province_id", "cell_id", "koppen_id",
                                          "koppen_group", "day_of_year")},
                "pred_lat": p["lat"], "pred_lon": p["lon"],
                "top1_lat": top["lat"], "top1_lon": top["lon"],
                "aux_lat": p["aux_lat"], "aux_lon": p["aux_lon"],
                "mean_lat": p["mean_lat"], "mean_lon": p["mean_lon"],
                "province_median_lat": medians[pid][0], "province_median_lon": medians[pid][1],
                **extra,
                "majority_lat": float(mrow["center_lat"]), "majority_lon": float(mrow["center_lon"]),
                "oracle_lat": p["oracle_lat"], "oracle_lon": p["oracle_lon"],
                "pred_province_id": pid,
                "pred_province_uncorrected_id": keys.index(p["province_without_prior_correction"]),
                "majority_province_id": answers["province_id"], "majority_cells_top5": answers["cells_top5"],
                "majority_koppen_id": answers["koppen_id"], "majority_koppen_group": answers["koppen_group"],
                "majority_day_of_year": answers["day_of_year"],
                "pred_cell_top5": p["top_cells"][:5],
                "pred_koppen_id": p.get("koppen_id", -1),
                "pred_koppen_group": int(_coarse(p.get("koppen_id", -1))),
                "pred_day_of_year": p.get("day_of_year"),
                "confidence": p["confidence"],
            })
        if progress:
            progress(min(start + batch_size, len(records)), len(records))
    return pd.DataFrame(rows), failed


def _coarse(fine: int) -> int:
    from pipeline.labels.koppen import coarse_group

    return int(coarse_group(np.array([fine]))[0])
