"""One real run of ``sample_world_images`` from the code location, started on a signal (tests/test_runs_race.py).

The process imports the code location and opens the instance first, then waits for ``--go`` to exist, so a race
between two runs does not depend on how long Python takes to start. Prints one JSON line: run id, success, and
the step's error (if any). ``python -m tests.race_driver --home H --data D --images N --go FILE [--lock-wait S]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, required=True)
    ap.add_argument("--go", required=True)
    ap.add_argument("--lock-wait", type=float, default=None)
    args = ap.parse_args(argv)
    os.environ["GEOPAK_DATA_ROOT"] = args.data
    import dagster as dg

    from pipeline.definitions import defs

    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("sample_world_images")})
    config: dict = {"ops": {"sample_world_images": {"config": {"n_images": args.images, "image_size": 96}}},
                    "resources": {"compute": {"config": {"workers": 1}}}}
    if args.lock_wait is not None:  # run config for a resource replaces its env mapping: give the path too
        config["resources"]["data_root"] = {"config": {"path": args.data, "stage_lock_wait_s": args.lock_wait}}
    with dg.DagsterInstance.from_config(args.home) as instance:
        print("ready", flush=True)
        while not Path(args.go).exists():
            time.sleep(0.02)
        result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    errors = [e.step_failure_data.error.to_string() for e in result.get_step_failure_events()]
    print(json.dumps({"run_id": result.run_id, "success": result.success, "error": "\n".join(errors)}), flush=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
