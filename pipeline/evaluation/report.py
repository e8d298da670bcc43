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
from pipeline.evaluation.bootstrap import LEVEL, METRICS, SAMPLES, SEED, Bootstrap, paired_bootstrap, verdict
from pipeline.core.day_of_year import circular_day_difference

# method column prefix -> label in the report; the oracle is never the headline
METHODS: dict[str, str] = {
    "pred": "GeoPak end to end (settings chosen on val)",
    "classifier": "GeoPak's classifier point, without refinement",
    "top1": "GeoPak, most probable hypothesis only",
    "mean": "GeoPak, weighted mean (GEOPAK's inference)",
    "aux": "GeoPak's auxiliary lat/lon head alone",
    "province_median": "baseline: predicted province's geometric median of training points",
    "province_cluster": "baseline: predicted province's densest cluster of training points",
    "knn": "baseline: kNN on the model's encoder features",
    "global_median": "baseline: geometric median of all training points (one constant answer)",
    "majority": "baseline: training set's majority cell centre",
    "oracle": "ORACLE: true cell + predicted offset (not achievable)",
}
# what GeoPak must beat (the oracle is not a baseline), each with its settings chosen on val
BASELINES = ("province_median", "province_cluster", "knn", "global_median", "majority")
# the headline metrics the verdict decides on: the selection rule's two
VERDICT_METRICS = ("median_km", "acc_25km")
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
    boot: Bootstrap
    plots: dict[str, bytes] = field(default_factory=dict)
    # extra sections (title -> table), rendered after the headline: settings chosen on val, val vs test, ...
    sections: dict[str, pd.DataFrame] = field(default_factory=dict)

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


def evaluate(df: pd.DataFrame, samples: int = SAMPLES, seed: int = SEED) -> EvaluationReport:
    """Every metric of the report from the per-image predictions (columns ``EVAL_COLUMNS`` + method columns),
    with paired bootstrap intervals (``samples`` resamples, ``seed``)."""
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
        boot=paired_bootstrap(errors, samples, seed),
    )


def make_plots(rep: EvaluationReport, df: pd.DataFrame, outlines: dict | None = None) -> dict[str, bytes]:
    """Error CDF, per-province accuracy bars, and a map of test points coloured by error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(3.6, 4.2))
    for key, err in rep.errors.items():
        xs = np.sort(np.maximum(err, 0.01))
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=key,  # the methods table says what each is
                linestyle="--" if key == "oracle" else "-")
    for k in ACC_KM:
        ax.axvline(k, color="#bbbbbb", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("great-circle error (km, log scale)")
    ax.set_ylabel("share of test images")
    ax.set_title("Error CDF on the test split")
    # below the axes: in a narrow picture a legend inside would hide the curves
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.2), frameon=False, ncol=2)
    plots["error_cdf.png"] = png_bytes(fig)

    fig, ax = plt.subplots(figsize=(3.8, 3.2))
    colour_of = {p.name: PROVINCE_COLOURS[p.id] for p in PROVINCES}
    ax.bar(rep.provinces["province"], rep.provinces["province_acc"], color=[colour_of[n] for n in rep.provinces["province"]])
    for i, (acc, n) in enumerate(zip(rep.provinces["province_acc"], rep.provinces["test_images"])):
        ax.text(i, acc + 0.01, f"{acc:.0%}\nn={n}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("province accuracy")
    ax.set_title("Province accuracy per province (test split)")
    fig.autofmt_xdate(rotation=25)
    plots["province_accuracy.png"] = png_bytes(fig)

    fig, ax = plt.subplots(figsize=(3.6, 3.4))
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


def _ci(value: float, interval: tuple[float, float], scale: float = 1.0, signed: bool = False) -> str:
    """``value [low, high]`` to one decimal (km, or percentage points with ``scale`` 100)."""
    f = "{:+.1f}" if signed else "{:.1f}"
    lo, hi = interval
    return f"{f.format(value * scale)} [{f.format(lo * scale)}, {f.format(hi * scale)}]"


def baseline_verdict(rep: EvaluationReport, method: str = "pred") -> dict:
    """Does ``method`` beat every baseline present? Only when, for each baseline, the paired bootstrap interval
    of the difference excludes zero in ``method``'s favour on the median error AND on the share within 25 km.
    Otherwise the decision names each baseline it is "not distinguishable" from (or worse than). With a Markdown
    table of the differences and their intervals."""
    rows, undecided, worse = [], [], []
    for b in BASELINES:
        if b not in rep.errors:
            continue
        row = {"baseline": METHODS[b]}
        name_b = METHODS[b].removeprefix("baseline: ")
        for metric in VERDICT_METRICS:
            diff = rep.metric(method, metric) - rep.metric(b, metric)
            interval = rep.boot.difference(method, b, metric)
            scale, unit = (100.0, "pp") if metric.startswith("acc") else (1.0, "km")
            name = "median" if metric == "median_km" else "≤25 km"
            row[f"Δ {name} ({unit}) GeoPak − baseline [{LEVEL:.0%} CI]"] = _ci(diff, interval, scale, signed=True)
            row[f"{name}: GeoPak is"] = said = verdict(*interval, METRICS[metric][1])
            if said == "worse":
                worse.append(name_b)
            elif said == "not distinguishable":
                undecided.append(name_b)
        rows.append(row)
    passed = bool(rows) and not undecided and not worse
    names = lambda xs: "; ".join(dict.fromkeys(xs))  # noqa: E731
    decision = "beats every baseline (every difference's interval excludes zero in GeoPak's favour)" if passed \
        else " — ".join(part for part in (f"not distinguishable from: {names(undecided)}" if undecided else "",
                                          f"worse than: {names(worse)}" if worse else "") if part) or "no baselines"
    frame = pd.DataFrame(rows)
    return {"passed": passed, "decision": decision, "not_distinguishable": list(dict.fromkeys(undecided)),
            "worse": list(dict.fromkeys(worse)), "frame": frame, "table": markdown_table(frame, max_rows=len(rows))}


def headline_table(rep: EvaluationReport) -> pd.DataFrame:
    """Every method's metrics, each with its paired bootstrap interval: ``value [low, high]``."""
    rows = []
    for r in rep.headline.itertuples(index=False):
        row = {"method": r.method}
        for metric in METRICS:
            pct = metric.startswith("acc")
            label = f"≤{metric[4:-2]} km (%)" if pct else metric.replace("_km", " km")
            row[label] = _ci(getattr(r, metric), rep.boot.interval(r.method_key, metric), 100.0 if pct else 1.0)
        rows.append(row)
    return pd.DataFrame(rows)


def selection_tables(selection: dict | None, rep: EvaluationReport, settings: dict[str, str]) -> dict[str, pd.DataFrame]:
    """The report's view of the checkpoint's val selection: every inference choice with its val score, the
    calibration, the checkpoint choice, and val against test for every method that has a val score."""
    from geopak_model.selection import setting_scores

    if not selection:
        return {"Settings chosen on val": pd.DataFrame(
            [{"note": "this checkpoint has no val selection record (trained before it existed, or untrained): "
                      "its config's inference settings are used as they are"}])}
    out = {}
    choices = pd.DataFrame(setting_scores(selection["candidates"]))
    choices["value"] = [v if isinstance(v, str) else ("on" if v else "off") if isinstance(v, bool) else f"{v:g}"
                        for v in choices["value"]]  # 0.03, 50, on
    choices["val ≤25 km %"] = 100 * choices.pop("val_acc_25km")
    choices["chosen"] = choices["chosen"].map({True: "← chosen", False: ""})
    out[f"Inference settings chosen on val ({selection['val_images']} images; rule: {selection['rule']})"] = \
        choices.rename(columns={"val_median_km": "val median km"})[
            ["setting", "value", "val median km", "val ≤25 km %", "chosen"]]
    cal = selection["calibration"]
    out["Calibration (temperatures fitted continuously on the val NLL; kept only if it wins on the rule)"] = \
        pd.DataFrame([{"province temperature": cal["province_temperature"],
                       "at search bound": cal["province_temperature_at_bound"],
                       "cell temperature": cal["cell_temperature"], "cell at search bound": cal["cell_temperature_at_bound"],
                       "val NLL before": cal["val_cell_nll_uncalibrated"], "val NLL after": cal["val_cell_nll_calibrated"],
                       "kept": cal["kept"]}])
    ck = selection.get("checkpoint")
    if ck:
        out[f"Checkpoint chosen on {ck['criterion']} (both candidates uncalibrated, default settings, whole val)"] = \
            pd.DataFrame([{"phase": int(k), ck["criterion"]: v.get("val_joint_nll"),
                           "val median km": v.get("val_median_km"), "val ≤25 km %": 100 * (v.get("val_acc_25km") or 0),
                           "chosen": "← chosen" if int(k) == ck["phase"] else ""} for k, v in ck["candidates"].items()])
    val = {"pred": selection["val"], "classifier": selection["classifier_val"]}
    for b, v in selection.get("baselines", {}).get("chosen", {}).items():
        val[b] = {"median_km": v["val_median_km"], "acc_25km": v["val_acc_25km"]}
    gap = []
    for key, v in val.items():
        if key not in rep.errors:
            continue
        t_med, t_acc = rep.metric(key, "median_km"), rep.metric(key, "acc_25km")
        gap.append({"method": METHODS[key], "settings": settings.get(key, ""), "val median km": v["median_km"],
                    "test median km": t_med, "test − val km": t_med - v["median_km"],
                    "val ≤25 km %": 100 * v["acc_25km"], "test ≤25 km %": 100 * t_acc,
                    # rounded first: equal shares differ by float noise, which would print as "-0.0"
                    "test − val ≤25 km (% points)": round(100 * (t_acc - v["acc_25km"]), 6) + 0.0})
    out["Validation against test (val scores of the chosen settings are optimistic: they won on val)"] = \
        pd.DataFrame(gap)
    return out


def data_table(images: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Images per province and split, and cells per province: what the report's figures rest on. ``images``:
    ``province_id`` and ``split`` of every labelled image; ``cells``: ``province_id`` of every cell."""
    counts = pd.crosstab(images["province_id"], images["split"]).reindex(range(len(PROVINCES)), fill_value=0)
    out = pd.DataFrame({"province": [p.name for p in PROVINCES]})
    for split in ("train", "val", "test", "buffer"):
        out[f"{split} images"] = counts[split].to_numpy() if split in counts else 0
    out["cells"] = cells["province_id"].value_counts().reindex(range(len(PROVINCES)), fill_value=0).to_numpy()
    total = {"province": "all", **{c: int(out[c].sum()) for c in out.columns if c != "province"}}
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def _sections(rep: EvaluationReport) -> list[tuple[str, pd.DataFrame]]:
    return [("Distance errors (95 % paired bootstrap intervals)", headline_table(rep)), *rep.sections.items(),
            ("Classification", rep.other), ("Per province", rep.provinces),
            ("Province confusion (rows: true, columns: predicted)", rep.confusion.reset_index())]


CAVEAT_PREFIX = "SAMPLE WORLD:"  # how pipeline.evaluation.run.SAMPLE_WORLD_WARNING begins


def split_caveats(notes: list[str]) -> tuple[list[str], list[str]]:
    """(caveats, other notes): a caveat about the data goes above everything, not among the bullets."""
    return [n for n in notes if n.startswith(CAVEAT_PREFIX)], [n for n in notes if not n.startswith(CAVEAT_PREFIX)]


def to_markdown(rep: EvaluationReport, title: str, notes: list[str], plot_links: bool = True,
                banner: str = "") -> str:
    caveats, notes = split_caveats(notes)
    parts = [*[f"> ⚠️ **{c}**\n" for c in caveats], f"# {title}", "", *([f"**{banner}**", ""] if banner else []),
             *[f"- {n}" for n in notes], "",
             f"Test images: **{rep.n_images}** (location- and owner-disjoint test split).", ""]
    for name, table in _sections(rep):
        parts += [f"## {name}", "", markdown_table(table, max_rows=max(len(table), 1)), ""]
    if plot_links:
        parts += ["## Plots", "", *[f"![{name}]({name})" for name in rep.plots], ""]
    return "\n".join(parts)


def to_html(rep: EvaluationReport, title: str, notes: list[str], banner: str = "") -> str:
    def table(df: pd.DataFrame) -> str:
        # km to 0.1, % to 0.1, shares to 3 digits: the same rule as the Markdown tables
        fmts = {c: column_floatfmt(c).format for c in df.columns if pd.api.types.is_float_dtype(df[c])}
        return df.to_html(index=False, formatters=fmts, border=0, classes="t")

    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
        f"<figcaption>{html.escape(n)}</figcaption></figure>" for n, b in rep.plots.items()
    )
    caveats, notes = split_caveats(notes)
    top = f'<p class="banner"><b>{html.escape(banner)}</b></p>' if banner else ""
    warn = "".join(f'<p class="caveat">&#9888; <b>{html.escape(c)}</b></p>' for c in caveats)
    body = "".join(f"<h2>{html.escape(name)}</h2>{table(t)}" for name, t in _sections(rep))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} .t td,.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
figure{{display:inline-block;margin:8px}} img{{max-width:520px}} .banner{{background:#fde2e1;padding:8px}}
.caveat{{background:#fff4ce;border:2px solid #e0a800;padding:10px 14px;font-size:1.15em}}</style></head><body>
{warn}<h1>{html.escape(title)}</h1>{top}<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
<p>Test images: <b>{rep.n_images}</b> (location- and owner-disjoint test split).</p>
{body}<h2>Plots</h2>{imgs}</body></html>"""


def write_report(rep: EvaluationReport, out_dir: Path, title: str, notes: list[str], banner: str = "",
                 record: dict | None = None) -> dict[str, Path]:
    """Write report.md, report.html, the PNGs and (``record``) evaluation.json into ``out_dir`` atomically."""
    import json

    from pipeline.evaluation.record import RECORD_FILE

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in rep.plots.items():
        paths[name] = atomic_write_bytes(out_dir / name, png)
    paths["report.md"] = atomic_write_bytes(out_dir / "report.md", to_markdown(rep, title, notes, banner=banner).encode())
    paths["report.html"] = atomic_write_bytes(out_dir / "report.html", to_html(rep, title, notes, banner).encode())
    if record is not None:
        tables = {name: t.to_dict("records") for name, t in _sections(rep)}
        paths[RECORD_FILE] = atomic_write_bytes(out_dir / RECORD_FILE, json.dumps(
            {**record, "title": title, "banner": banner, "notes": notes, "test_images": rep.n_images,
             "tables": tables}, indent=1, default=str, ensure_ascii=False).encode())
    return paths


def test_predictions(
    predictor, test: pd.DataFrame, train: pd.DataFrame, read_bytes, batch_size: int = 32, progress=None,
    top_provinces: int | None = None, top_cells: int | None = None, chosen_baselines: dict | None = None,
    knn_gallery=None,
) -> tuple[pd.DataFrame, list[dict], dict[str, str]]:
    """Run the predictor over the test rows, reading each image EXACTLY ONCE: ``read_bytes(path)`` is called once
    per row, the bytes are decoded once, and everything else that needs the image — the kNN baseline's
    features — comes from that one pass through the encoders. Returns the per-image frame ``evaluate`` takes,
    the unreadable rows (not scored) and a line per method saying its settings.

    ``test``/``train`` carry the labelled columns plus ``cell_id`` (and the cells' centres for the majority
    baseline). ``chosen_baselines``: the checkpoint's val-chosen baseline settings and training-only answers
    (``selection["baselines"]["chosen"]``); ``knn_gallery``: the training images' encoder features. Every
    baseline comes from the training split alone.
    """
    from geopak_model.predictor import ImageLoadError, load_input
    from pipeline.evaluation.baselines import baseline_answers, majority_answers

    majority = train["cell_id"].value_counts().idxmax()
    mrow = train.loc[train["cell_id"] == majority].iloc[0]
    answers = majority_answers(train)
    size = predictor.cfg.encoder.image_size
    rows, failed, features = [], [], []
    keys = [pp.key for pp in PROVINCES]
    records = test.to_dict("records")
    for start in range(0, len(records), batch_size):
        chunk, images = [], []
        for r in records[start : start + batch_size]:
            try:  # the one read of this image; a broken one is reported, never retried
                images.append(load_input(read_bytes(r["path"]), size))
                chunk.append(r)
            except ImageLoadError as exc:
                failed.append({"image_id": r["image_id"], "error": str(exc)})
        preds = predictor.predict(images, top_provinces, top_cells, batch_size,
                                  oracle_cells=[int(r["cell_id"]) for r in chunk],
                                  features=knn_gallery is not None) if images else []
        for r, p in zip(chunk, preds):
            top = p["hypotheses"][0] if p["hypotheses"] else {"lat": p["lat"], "lon": p["lon"]}
            if "encoder_features" in p:
                features.append(p["encoder_features"])
            rows.append({
                **{k: r.get(k) for k in ("image_id", "lat", "lon", "province_id", "cell_id", "koppen_id",
                                          "koppen_group", "day_of_year")},
                "pred_lat": p["lat"], "pred_lon": p["lon"],
                "classifier_lat": p["classifier_lat"], "classifier_lon": p["classifier_lon"],
                "top1_lat": top["lat"], "top1_lon": top["lon"],
                "aux_lat": p["aux_lat"], "aux_lon": p["aux_lon"],
                "mean_lat": p["mean_lat"], "mean_lon": p["mean_lon"],
                "majority_lat": float(mrow["center_lat"]), "majority_lon": float(mrow["center_lon"]),
                "oracle_lat": p["oracle_lat"], "oracle_lon": p["oracle_lon"],
                "pred_province_id": keys.index(p["province"]),
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
    df = pd.DataFrame(rows)
    settings: dict[str, str] = {}
    if len(df):
        base, settings = baseline_answers(chosen_baselines, train, df["pred_province_id"].to_numpy(),
                                          np.stack(features) if features else None, knn_gallery)
        for key, (la, lo) in base.items():
            df[f"{key}_lat"], df[f"{key}_lon"] = la, lo
    settings["majority"] = "no setting (the training split's most frequent cell)"
    return df, failed, settings


def _coarse(fine: int) -> int:
    from pipeline.core.koppen_classes import coarse_group

    return int(coarse_group(np.array([fine]))[0])
