"""`persimmon-batch generate|classify|label|score|plan|capacity|demo` over `pipeline.api`.

Flags are generated from `PipelineConfig`'s fields; `--config FILE.yaml` supplies any of them,
flags win. Exit status (README): 0 complete, 1 rows missing or failed (also after SIGTERM), 130
after SIGINT, 2 bad config, input or model, or a pool local Ray cannot hold (nothing computed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Literal, Union, get_args, get_origin

from .errors import ConfigError, InputError, ModelError
from .report import summary
from .settings import PipelineConfig, mask_uri, read_yaml
from .stages import TASK_NAMES, TASK_SETTINGS, TASKS

ENGINE_FIELDS = {"batch_size", "max_num_seqs", "max_seq_len", "kv_cache_gib", "memory_fraction", "dtype", "quantization",
                 "quantize_lm_head", "device"}
IO_FIELDS = ("input", "output", "model", "id_column", "prompt_column", "keep_columns", "prompt_template",
             "chat_template", "examples", "input_format", "output_format")
PLAN_WHAT = ("lists the inputs, makes the units, runs every check the run makes before it starts (bad files, "
             "duplicate and null ids, the output directory, what is already committed or stale, the model and "
             "attachments) and measures prompt lengths in the model's tokens; with --gpu, estimates GPU-hours "
             "and cost per GPU type. Writes nothing and starts no Ray.")
PLAN_HELP = "Check a run without running it, with the task command's flags: " + PLAN_WHAT
EPILOG = ("Every input file becomes one output file with the same name, committed atomically; "
          "rerunning the same command resumes (finished files are skipped). "
          "_run_report.json in the output directory has row, error and token counts.")


class _Parser(argparse.ArgumentParser):
    """argparse, its errors in one line naming the flag (not after a 45-line usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_text(f) -> str:
    default = f.get_default(call_default_factory=True)
    if default in (None, [], ""):
        return ""
    if isinstance(default, list):
        default = ",".join(map(str, default))
    if isinstance(default, str) and not default.strip():
        default = repr(default)
    return f" (default: {default})"


def _add_config_flags(parser: argparse.ArgumentParser, task: str) -> None:
    groups = {
        "io": parser.add_argument_group("input, output, model"),
        "task": parser.add_argument_group(TASKS[task].flag_group),
        "engine": parser.add_argument_group("engine and memory (see `persimmon-batch capacity`)"),
        "run": parser.add_argument_group("replicas, resources, resume, storage, Ray"),
    }
    own = TASKS[task].settings

    def group_of(name):
        return "io" if name in IO_FIELDS else "task" if name in own else "engine" if name in ENGINE_FIELDS else "run"

    order = list(groups)  # flags added group by group, so the usage line reads in the same order
    for name, f in sorted(PipelineConfig.__pydantic_fields__.items(), key=lambda item: order.index(group_of(item[0]))):
        if (f.json_schema_extra or {}).get("cli") is False or (name in TASK_SETTINGS and name not in own):
            continue
        help_text = f.description.replace("%", "%%") + _default_text(f)
        group = groups[group_of(name)]
        kwargs: dict = {"dest": name, "default": None, "help": help_text}
        kind = f.annotation
        if get_origin(kind) is Union:  # Optional[X], or one of several types: its first
            kind = next(t for t in get_args(kind) if t is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if kind in (int, float):
                kwargs["type"] = kind
            if get_origin(kind) is Literal:
                kwargs["choices"] = list(get_args(kind))
            kwargs["metavar"] = {"input": "URI", "output": "URI", "model": "DIR_OR_URI",
                                  "score_after": "TEXT_OR_COLUMN"}.get(name)
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(  # subcommands' parsers are of the same class
        prog="persimmon-batch",
        description="Batch inference with Persimmon on Ray Data: Parquet, JSONL, CSV or OpenAI batch files "
                    "in; Parquet, JSONL or OpenAI batch files out.",
        epilog="Start with `persimmon-batch demo`. Every command takes --help.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(TASK_NAMES) + ",plan,capacity,demo}")
    for task in TASK_NAMES:
        text = TASKS[task].description
        p = sub.add_parser(task, help=text, description=text, epilog=EPILOG)
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file with any of the options below (flags override it).")
        p.add_argument("--print-report", action="store_true", help="Print the full run report JSON at the end.")
        p.add_argument("--quiet", action="store_true", help="Only the final summary (no progress).")
        _add_config_flags(p, task)
    _add_plan_parser(sub)
    from .capacity_cli import add_parser as add_capacity

    add_capacity(sub)
    demo = sub.add_parser("demo", help="Build a tiny random model and sample input files in a temp dir and "
                          "run generate, label and classify on local Ray (about a minute on 2 CPUs).",
                          description="End-to-end demo on local Ray with the embedded tiny model. "
                          "Its weights are random, so texts are noise: it shows the plumbing.")
    demo.add_argument("--dir", help="Work directory (default: a new temp dir, deleted afterwards).")
    demo.add_argument("--tasks", default="generate,label,classify",
                      help=f"Comma-separated tasks to run, of {','.join(TASK_NAMES)}.")
    demo.add_argument("--files", type=int, default=4, help="Input files to write.")
    demo.add_argument("--rows", type=int, default=8, help="Rows per input file.")
    demo.add_argument("--replicas", default="2", help="Replicas (N or MIN,MAX).")
    return parser


def _add_plan_parser(sub) -> None:
    from model.capacity import GPUS

    from .cost import PRICES
    from .prompt_stats import SAMPLE_ROWS

    plan = sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP,
                          epilog="e.g. persimmon-batch plan generate --input data/ --output out/ --model DIR "
                                 "(also: plan --task generate ..., or plan --config FILE.yaml when the file names "
                                 "its task). Exit status: 0 when the run could start; 2 for a bad config, input or "
                                 "model, as the task command would exit.")
    tasks = plan.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASK_NAMES) + "}")
    for task in TASK_NAMES:
        text = f"Check `persimmon-batch {task}` without running it, with the same flags: {PLAN_WHAT}"
        p = tasks.add_parser(task, help=f"plan `persimmon-batch {task}`", description=text)
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file with any of the options below (flags override it).")
        p.add_argument("--json", action="store_true", help="Print the plan as JSON instead of text.")
        p.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS, metavar="N",
                       help=f"Measure prompt lengths (p50/p90/p99/max tokens, rows over --max-seq-len) on N rows "
                            f"drawn at random, the same rows each time (default: {SAMPLE_ROWS}); 0 = every row, "
                            "exact but slower (each prompt is tokenized).")
        _add_config_flags(p, task)
        cost = p.add_argument_group("cost estimate (roofline; pipeline/cost.py)")
        cost.add_argument("--gpu", metavar="GPU[,GPU...]",
                          help="Estimate the run's GPU-hours and cost on these GPUs (" + ", ".join(GPUS)
                               + "): KV cache and rows in flight from `capacity`, prefill and decode time from "
                               "datasheet bandwidth and FLOP/s (a lower bound, not a measurement).")
        cost.add_argument("--price-per-hour", metavar="GPU=USD[,...]",
                          help="USD per GPU-hour, overriding the defaults (approximate AWS on-demand list prices "
                               "of mid-2025 for " + ", ".join(PRICES) + "), e.g. L4=0.80,H100-80GB=4.5.")
        cost.add_argument("--calibration", metavar="gpu_bench.json", action="append",
                          help="A bench/gpu_bench.py result: decode time on its GPU is scaled by its measured / "
                               "roofline decode step (repeat for several GPUs; default: the checkout's "
                               "bench/results/*.json).")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    task = args.task if args.command == "plan" else args.command
    flags = {name: getattr(args, name) for name in PipelineConfig.__pydantic_fields__
             if getattr(args, name, None) is not None}
    raw = {}
    if args.config:
        raw = read_yaml(args.config)  # from_dict reads dashes as underscores
        if raw.get("task", task) != task:
            raise ConfigError(f"{args.config} is for task {raw['task']!r}, not {task!r}")
    if getattr(args, "quiet", False):
        flags["progress"] = False
    for key in ("prompt_template", "choice_separator", "score_after"):  # let shell users write \n for a newline
        if key in flags:
            flags[key] = flags[key].replace("\\n", "\n").replace("\\t", "\t")
    return PipelineConfig.from_dict({**raw, "task": task}, **flags).validate()


def plan_main(args: argparse.Namespace) -> int:
    """`persimmon-batch plan <task> ...`: print the plan (text or --json); 0, or 2 as the run would."""
    from .api import dry_run
    from .capacity_cli import HEADS, read_config
    from .cost import calibrations, estimate, estimate_lines, parse_gpus, parse_prices
    from .plan import summary_lines

    try:  # bad flags first, before the plan's work
        if args.sample_rows < 0:
            raise ConfigError(f"--sample-rows: must be >= 0 (0 = every row), got {args.sample_rows}")
        for flag in ("price_per_hour", "calibration") if args.gpu is None else ():
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} is for the cost estimate: give --gpu too")
        gpus = parse_gpus(args.gpu) if args.gpu is not None else []
        prices = parse_prices(args.price_per_hour, gpus)
        config = config_from_args(args)
        plan = dry_run(config, sample_rows=args.sample_rows)
        if gpus:
            model_config, architecture = read_config(config.model, config)
            plan["estimate"] = estimate(config, model_config, HEADS[architecture], plan["prompt_tokens"],
                                        plan["rows_to_run"], gpus, prices, calibrations(args.calibration, gpus=gpus))
    except (ConfigError, InputError, ModelError, OSError, ValueError) as e:
        print(f"persimmon-batch plan: error: {mask_uri(str(e))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    took = plan["seconds"]
    print(f"persimmon-batch plan {config.task}: nothing written, no replica started")
    print("\n".join("  " + line for line in summary_lines(plan)))
    if "estimate" in plan:
        print("\n".join("  " + line for line in estimate_lines(plan["estimate"])))
    print(f"  output  {plan['output']}")
    print("  took    " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items())
          + f", prompts {plan['prompt_tokens']['seconds']:.1f} s")
    return 0


def _task_first(argv: list[str]) -> list[str]:
    """`plan --task T ...`, and `plan --config F.yaml ...` naming its task, as `plan T ...` (each
    task has its own flags)."""
    if len(argv) < 2 or argv[0] != "plan" or argv[1] in (*TASK_NAMES, "-h", "--help"):
        return argv
    rest = argv[1:]
    for i, arg in enumerate(rest):
        if arg == "--task" and i + 1 < len(rest):
            return ["plan", rest[i + 1], *rest[:i], *rest[i + 2:]]
        if arg.startswith("--task="):
            return ["plan", arg.split("=", 1)[1], *rest[:i], *rest[i + 1:]]
    path = next((rest[i + 1] for i, arg in enumerate(rest[:-1]) if arg == "--config"), None)
    task = read_yaml(path).get("task") if path else None
    return ["plan", task, *rest] if task in TASK_NAMES else argv


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a run owns the signals (imports, the model check): no
        # lease was taken and nothing written, so one line and 130, not a traceback
        print("persimmon-batch: interrupted before anything was started", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _task_first(argv)
    except ConfigError as e:
        print(f"persimmon-batch plan: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return plan_main(args)
    if args.command == "capacity":
        from .capacity_cli import run as run_capacity

        try:
            return run_capacity(args)
        except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
            print(f"persimmon-batch capacity: error: {e}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from .demo import run_demo

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks or set(tasks) - set(TASK_NAMES):
            print(f"persimmon-batch demo: error: --tasks takes some of {', '.join(TASK_NAMES)}, got {args.tasks!r}",
                  file=sys.stderr)
            return 2
        return run_demo(directory=args.dir, tasks=tasks, files=args.files, rows=args.rows, replicas=args.replicas)
    from .api import run

    try:
        config = config_from_args(args)
        report = run(config)
    except (ConfigError, InputError, ModelError, OSError, ValueError) as e:  # bad config / input / model, or
        # a store that cannot be reached (pyarrow raises ValueError subclasses for bad URIs): nothing was
        # computed; one line, no traceback
        print(f"persimmon-batch: error: {mask_uri(str(e))}", file=sys.stderr)
        return 2
    if args.print_report:
        print(json.dumps(report, indent=2))
    print(summary(report))
    if report.get("interrupted") == "SIGINT":
        return 130
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
