"""Serve the pipeline flow as a Prefect deployment (needs a running Prefect server).

    prefect server start                                   # terminal 1 (UI at http://127.0.0.1:4200)
    python flows/deploy.py                                 # terminal 2: serves the deployment
    prefect deployment run 'ardetect-pipeline/ardetect'    # terminal 3: trigger a run

Pass --cron "0 3 * * *" to also run it on a schedule.
"""

from __future__ import annotations

import argparse

from pipeline import pipeline  # flows/ is the script's folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="ardetect")
    parser.add_argument("--cron", default=None, help="optional schedule, cron syntax")
    args = parser.parse_args()
    pipeline.serve(name=args.name, cron=args.cron, tags=["ardetect"])
