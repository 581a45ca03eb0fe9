"""Serve the pipeline flow as a Prefect deployment (needs a running Prefect server).

    prefect server start                                   # terminal 1 (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api       # terminals 2 and 3
    python flows/deploy.py                                 # terminal 2: serves the deployment
    prefect deployment run 'ardetect-pipeline/ardetect'    # terminal 3: trigger a run

Pass --cron "0 3 * * *" to also run it on a schedule. Ctrl-C stops serving (a run in progress is
stopped as the flow stops on Ctrl-C: its stage ends and its MLflow runs end KILLED).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import urllib.error
import urllib.request

from pipeline import pipeline  # flows/ is the script's folder


def server_problem(url: str | None, timeout: float = 5.0) -> str | None:
    """Why the deployment cannot be served to ``url`` (the configured PREFECT_API_URL), or None when its server answers.

    Without one, Prefect serves from a temporary server of its own that ends with this process: there is no UI, and
    `prefect deployment run --watch` in another terminal never sees its run finish."""
    if not url:
        return ("PREFECT_API_URL is not set: a deployment is served to a Prefect server that outlives this process. "
                "Start one (`prefect server start`, in another terminal), then `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
                "(or `prefect config set PREFECT_API_URL=...`) and run this again")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as err:
        return f"the Prefect server at PREFECT_API_URL={url} answers /health with HTTP {err.code}: is it a Prefect API URL (…/api)?"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return (f"no Prefect server answers at PREFECT_API_URL={url} within {timeout:g} s ({reason}): start it "
                "(`prefect server start`), or set PREFECT_API_URL to the one that runs")


def cron_problem(cron: str | None) -> str | None:
    """Why ``--cron`` is no schedule Prefect takes, or None."""
    if cron is None:
        return None
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:  # pydantic's ValidationError is one
        return f"--cron {cron!r}: not a cron expression (five fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *')"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="ardetect", help="the deployment's name (runs: 'ardetect-pipeline/<name>')")
    parser.add_argument("--cron", default=None, help="optional schedule, cron syntax")
    args = parser.parse_args(argv)
    if not args.name.strip():
        parser.error("--name: give the deployment a name")
    from prefect.settings import get_current_settings

    problem = cron_problem(args.cron) or server_problem(get_current_settings().api.url)
    if problem:
        print(f"deploy: {problem}", file=sys.stderr)
        return 2
    stopped = []

    def interrupt(signum, frame):  # Prefect catches the KeyboardInterrupt and returns: the exit code says it was Ctrl-C
        stopped.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    # Prefect's runner keeps a folder in the temp folder (runner_storage/<uuid>) that it removes only when its shutdown
    # completes, which a Ctrl-C or SIGTERM cuts short: each serve left one behind. Its temp folder is made ours, removed here.
    own_tmp = tempfile.mkdtemp(prefix="ardetect-deploy-")
    tempfile.tempdir = own_tmp
    try:
        pipeline.serve(name=args.name, cron=args.cron, tags=["ardetect"])
    except KeyboardInterrupt:
        stopped.append(signal.SIGINT)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(own_tmp, ignore_errors=True)
    if stopped:
        print(f"deploy: Ctrl-C: stopped serving 'ardetect-pipeline/{args.name}'", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
