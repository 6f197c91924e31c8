"""Shared body of the job modules: parse the config, run the pipeline, print the summary."""

from __future__ import annotations

import sys


def main(task: str, argv: list[str] | None = None) -> int:
    from pipeline.cli import main as cli_main

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [task]:  # tolerate `python -m jobs.label label --config ...`
        args = args[1:]
    return cli_main([task, *args])
