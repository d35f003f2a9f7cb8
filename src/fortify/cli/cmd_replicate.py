"""``fortify replicate NAME``: CPU-scale replications of the papers' tables."""

from __future__ import annotations

import argparse

from fortify.cli._plugins import add_plugin_parsers, run_plugin

DESCRIPTION = "Run a CPU-scale replication of a paper's table and write it to a run directory."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for _, (mod, sub) in add_plugin_parsers(parser, "fortify.replicate", "name").items():
        if hasattr(mod, "jobs"):
            sub.add_argument(
                "--workers",
                type=int,
                default=1,
                metavar="N",
                help="run the independent jobs (rows) in N processes with the CPU cores split "
                "between them (one GPU each on a GPU machine); logs in <out>/jobs/; resumable",
            )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fortify.replicate.workers import check_workers, run_jobs

    workers = check_workers(getattr(args, "workers", 1))
    if workers > 1 and not getattr(args, "estimate", False):  # --estimate only measures
        jobs = args._plugin.jobs(args)
        if jobs:  # none left when every (row, seed) has a committed result
            results = run_jobs(jobs, min(workers, len(jobs)), Path(args.out) / "jobs")
            print(
                f"{len(results)} job(s) finished in {workers} worker(s): "
                + ", ".join(f"{r.job.label} {r.seconds / 60:.1f} min" for r in results)
            )
    return run_plugin(args)
