"""Planning on the driver, before any model work: list inputs, check them, name the outputs.

Each input file is one work unit (or several with `rows_per_unit`: Parquet row groups, JSONL /
CSV row ranges). Output names come from the input file only, so a rerun plans the same names
and skips the units already committed:

    in/part-00003.parquet               -> out/part-00003.parquet
    in/2024/01/a.jsonl.gz               -> out/2024__01__a.parquet   (path below the input directory)
    big.parquet, rows_per_unit=1000     -> out/big.rg00000-00003.parquet, ...
    big.csv, rows_per_unit=1000         -> out/big.rows000000000-000000999.parquet, ...

Every committed output carries its unit's statistics (Parquet footer, JSONL sidecar), so a
resumed run's report counts the units of earlier runs from a footer read, not a recompute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import ConfigError, InputError, RowError
from .settings import PipelineConfig, mask_uri, output_columns
from .stages import TASKS, output_schema
from .formats import DATA_SUFFIXES, INPUT_FORMATS, OUTPUT_FORMATS, Split, input_format, strip_suffix
from .ids import InputChanged, flag_ids
from .storage import Location, glob_regex, inside, place, resolve, retry

log = logging.getLogger(__name__)

REPORT_NAME = "_run_report.json"
# config fields that change what a row's result is: outputs written under other values are stale
COMMON_RESULT_FIELDS = ("task", "model", "id_column", "prompt_column", "keep_columns", "prompt_template",
                        "chat_template", "max_seq_len", "check_duplicate_ids", "dtype", "quantization",
                        "quantize_lm_head", "model_identity", "output_format")


# ---- listing the inputs ------------------------------------------------------------------
def _is_hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.split("/") if part)


@dataclass(frozen=True)
class InputFile:
    """A listed input file: where it is, its name relative to its input item, size and mtime."""

    loc: Location
    name: str
    size: int | None
    mtime_ns: int | None = None


class Listing(list):
    """The InputFiles `list_inputs` found; `left_out`: the URIs of directory files not read."""

    def __init__(self, files=(), left_out=()):
        super().__init__(files)
        self.left_out: list[str] = list(left_out)


def list_inputs(inputs, config, exclude: Location | None = None) -> Listing:
    """Expand directories, globs and lists into input files, sorted by URI, no duplicates.

    Names starting with `_` or `.` (_SUCCESS, temp, .crc files) are ignored. A glob takes what it
    matches; a directory (recursively) only files named as a data format or --input-format, in any
    case (`FEB.CSV`), and under --input-format auto no plain `.json` (often metadata such as
    `dataset_info.json`). Its other files are named in a warning and in `left_out`, never skipped
    silently. An existing path is taken as is, glob characters or not. Files under `exclude` (the
    output inside an input tree, symlinks resolved) are never inputs; matching nothing is an error.
    Names are relative to their input item: stable when other partitions come and go.
    """
    forced = getattr(config, "input_format", "auto")
    suffixes = INPUT_FORMATS[forced].suffixes if forced not in (None, "auto") else DATA_SUFFIXES
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    found: dict[str, InputFile] = {}
    left_out: dict[str, InputFile] = {}
    skip = place(exclude) if exclude is not None else None
    for item in items:
        loc = resolve(item, config)
        matches: list[InputFile] = []
        others: list[InputFile] = []
        info = retry(lambda: loc.fs.get_file_info(loc.path), f"stat {loc.uri}", loc.retries)
        base = pattern = None
        if info.type == pafs.FileType.NotFound and any(c in loc.path for c in "*?["):
            base = loc.path[: min(loc.path.find(c) for c in "*?[" if c in loc.path)].rsplit("/", 1)[0]
            if loc.uri.endswith(loc.path) and not loc.uri[: len(loc.uri) - len(loc.path)].endswith(":/"):
                # the URI spells the path as the filesystem does
                base_uri = loc.uri[: len(loc.uri) - len(loc.path) + len(base)]
            else:  # fsspec stores may spell it otherwise (memory://x is the path /x)
                base_uri = f"{loc.scheme}://{base.lstrip('/')}"
            pattern = glob_regex(loc.path)
        elif info.type == pafs.FileType.File:
            matches.append(InputFile(loc, loc.path.rsplit("/", 1)[-1], info.size, info.mtime_ns))
        elif info.type == pafs.FileType.Directory:
            base, base_uri = loc.path, loc.uri
        if base is not None:
            prefix = base_uri if base_uri.endswith("://") else base_uri.rstrip("/") + "/"  # memory:// + name
            infos = retry(lambda: loc.fs.get_file_info(pafs.FileSelector(base, recursive=True)), f"list {base_uri}",
                          loc.retries)
            for info in infos:
                rel = info.path[len(base.rstrip("/")) + 1:]
                if info.type != pafs.FileType.File or _is_hidden(rel) or (pattern and not pattern.match(info.path)):
                    continue
                listed = InputFile(loc.at(info.path, prefix + rel), rel, info.size, info.mtime_ns)
                taken = pattern or (info.path.lower().endswith(suffixes)
                                    and not (forced in (None, "auto") and _PLAIN_JSON.search(info.path)))
                (matches if taken else others).append(listed)
        if skip is not None:
            matches = [m for m in matches if not inside(place(m.loc), skip)]
            others = [m for m in others if not inside(place(m.loc), skip)]
        if not matches:
            raise FileNotFoundError(f"input {item!r} matches no input files ({', '.join(suffixes[:4])}, ...)")
        for m in matches:
            found.setdefault(m.loc.uri, m)
        for m in others:
            left_out.setdefault(m.loc.uri, m)
    left = [left_out[k] for k in sorted(left_out) if k not in found]  # another item may name it
    if left:
        json_note = ("; plain .json files are read when named, globbed or with --input-format jsonl"
                     if any(_PLAIN_JSON.search(f.loc.path) for f in left) else "")
        read = sorted({s for s in suffixes if s.count(".") == 1 and not (s == ".json" and forced in (None, "auto"))})
        log.warning("%d file(s) in the input directory are not read as data (%s%s): data files end in %s "
                    "(any case, also compressed); name a file or use a glob to read it%s", len(left),
                    ", ".join(f.name for f in left[:5]), ", ..." if len(left) > 5 else "", ", ".join(read), json_note)
    return Listing([found[k] for k in sorted(found)], [f.loc.uri for f in left])


_PLAIN_JSON = re.compile(r"\.json(\.(gz|zst|bz2))?$", re.I)


def result_fields(config: PipelineConfig) -> tuple[str, ...]:
    return COMMON_RESULT_FIELDS + TASKS[config.task].result_fields(config)


@dataclass
class Unit:
    """One retryable, resumable piece of work: some row groups of one input file."""

    input_uri: str
    input_path: str
    row_groups: list[int] | None                          # Parquet; None: a row range of a JSONL / CSV file
    num_rows: int
    output_name: str
    first_row: int = 0                                    # of the unit in its file
    row_errors: list = field(default_factory=list)        # [[row in unit, RowError]]: not run
    fingerprint: dict = field(default_factory=dict)       # what the input is (see input_fingerprint)
    input_format: str = "parquet"

    @property
    def split(self) -> Split:
        return Split(self.row_groups, self.first_row, self.num_rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        unit = cls(**json.loads(text))
        unit.row_errors = [[row, RowError(*error)] for row, error in unit.row_errors]
        return unit


@dataclass
class Plan:
    units: list[Unit]
    schema: pa.Schema | None                       # the output schema of every file
    done: dict[str, dict] = field(default_factory=dict)   # output_name -> stats from its footer
    stale: list = field(default_factory=list)             # committed outputs whose input has changed
    bad_inputs: list[dict] = field(default_factory=list)  # {"input", "error", "rows"}
    output: Location | None = None
    ids: dict = field(default_factory=dict)               # duplicate / null id summary
    overwritten: list[str] = field(default_factory=list)  # committed outputs deleted (or to delete) for --overwrite
    seconds: dict = field(default_factory=dict)           # time spent by each planning step
    warnings: list[str] = field(default_factory=list)     # the task's doubts about the inputs

    @property
    def todo(self) -> list[Unit]:
        return [u for u in self.units if u.output_name not in self.done]


def result_config(config: PipelineConfig) -> dict:
    """The settings a row's result depends on and the output columns, as every footer records them."""
    public = {**config.public_dict(), "dtype": config.resolved_dtype}  # what replicas run in, not "auto"
    return {**{k: public[k] for k in result_fields(config)}, "columns": list(output_columns(config.task))}


def input_fingerprint(digest: str, listed, split: Split) -> dict:
    """What a unit's input *is*: size and mtime (a rewrite changes them unless cp -p / rsync -t),
    content digest (Parquet: footer and id column; JSONL / CSV: all bytes), row groups or range.
    `make_plan` adds the rows flagged as duplicate or null ids: they depend on the other files."""
    return {"size": listed.size, "mtime_ns": listed.mtime_ns, "footer_sha256": digest,
            "row_groups": split.row_groups, "first_row": split.first_row, "rows": split.num_rows}


def read_unit_stats(loc: Location) -> dict | None:
    """Stats of a committed output (Parquet footer or JSONL sidecar), None if it is not valid."""
    fmt = OUTPUT_FORMATS["jsonl" if loc.path.endswith(".jsonl") else "parquet"]
    try:
        return fmt.read_stats(loc)
    except Exception as e:  # noqa: BLE001 - anything unreadable is simply not done
        log.warning("ignoring unreadable output %s (%s); it will be recomputed", loc.uri, e)
        return None


def make_plan(config: PipelineConfig, threads: int = 16, write: bool = True) -> Plan:
    """List and check the inputs, name the outputs, find the units already committed. InputError
    for bad input files unless on_bad_input='skip'; ConfigError for output files this plan would
    not write or written with other settings. `write=False` (`plan`): --overwrite only lists."""
    t0 = time.perf_counter()
    out = resolve(config.output, config)
    for item in (config.input if isinstance(config.input, (list, tuple)) else [config.input]):
        loc = resolve(item, config)
        if inside(place(loc), place(out)):
            raise ConfigError(f"input {mask_uri(loc.uri)} is inside the output directory {mask_uri(out.uri)}: "
                              "outputs would be read as inputs; use separate directories")
    listed = list_inputs(config.input, config, exclude=out)  # an output inside an input tree is skipped
    seconds = {"list": time.perf_counter() - t0}
    files = [f.loc for f in listed]
    formats = {f.loc.uri: input_format(f.loc.path, config.input_format) for f in listed}
    with ThreadPoolExecutor(min(threads, len(files))) as pool:
        inspected = list(pool.map(lambda loc: formats[loc.uri].inspect(loc, config), files))
    seconds["inspect"] = time.perf_counter() - t0 - seconds["list"]

    extension = OUTPUT_FORMATS[config.output_format].extension
    units, bad, good, schema, schema_from, columns = [], [], [], None, None, {}
    for listed_file, found in zip(listed, inspected):
        loc, problem = listed_file.loc, found.problem
        if problem is None:
            if schema is None:
                schema, schema_from = output_schema(config, found.schema), loc.uri
            else:
                for col in (config.id_column, *config.keep_columns):
                    here, there = found.schema.field(col).type, schema.field(col).type
                    if here != there and not pa.types.is_null(here):
                        if pa.types.is_null(there):  # a column of nulls so far: this file says what it is
                            schema = schema.set(schema.get_field_index(col), pa.field(col, here))
                            continue
                        problem = f"column {col!r} is {here} here but {there} in {schema_from}"
                        break
        if problem is not None:
            bad.append({"input": loc.uri, "error": problem, "rows": found.num_rows if found.schema else None})
            continue
        absent = set(json.loads((found.schema.metadata or {}).get(b"absent", b"[]")))  # JSONL: keys no row has
        columns[mask_uri(loc.uri)] = set(found.schema.names) - absent
        stem = strip_suffix(listed_file.name).replace("/", "__")  # partition directories: a=1/x.jsonl -> a=1__x
        fmt = formats[loc.uri]
        file_units = [Unit(loc.uri, loc.path, sp.row_groups, sp.num_rows,
                           fmt.split_name(stem, sp, len(found.splits)) + extension, first_row=sp.first_row,
                           fingerprint=input_fingerprint(found.digest, listed_file, sp), input_format=fmt.name)
                      for sp in found.splits]
        units += file_units
        good.append((loc, listed_file.name, file_units))

    if bad and config.on_bad_input == "error":
        lines = "\n".join(f"  {b['input']}: {b['error']}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise InputError(f"{len(bad)} bad input file(s) (use --on-bad-input=skip to leave them out):\n{lines}{more}")
    names = [u.output_name for u in units]
    if len(set(names)) != len(names):
        raise ConfigError("inputs map to clashing output names; give inputs from one directory tree")

    plan = Plan(units=units, schema=schema, bad_inputs=bad, output=out, seconds=seconds,
                warnings=TASKS[config.task].input_warnings(config, columns))
    for warning in plan.warnings:
        log.warning("%s", warning)
    t1 = time.perf_counter()
    if config.check_duplicate_ids:
        try:
            plan.ids = flag_ids(config, good, threads)
        except InputChanged as e:
            raise InputError(str(e)) from None
    for u in units:  # a file added earlier in input order that claims a unit's ids makes it stale
        u.fingerprint["row_errors_sha256"] = hashlib.sha256(json.dumps(sorted(u.row_errors)).encode()).hexdigest()[:32]
    t2 = time.perf_counter()
    _find_done(config, plan, write)
    seconds.update(ids=t2 - t1, committed=time.perf_counter() - t2)
    plan.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return plan


def describe(config: PipelineConfig, plan: Plan, prompts: dict | None = None, in_use_by: dict | None = None) -> dict:
    """The plan in numbers: `plan --json`, and what a run says first (`summary_lines`)."""
    todo = plan.todo
    return {
        "task": config.task, "output": mask_uri(plan.output.uri),
        "input_files": len({u.input_uri for u in plan.units}), "rows": sum(u.num_rows for u in plan.units),
        "units": len(plan.units), "already_committed": len(plan.done), "to_run": len(todo),
        "rows_to_run": sum(u.num_rows for u in todo),
        "stale": [s["output"] for s in plan.stale], "overwrite": plan.overwritten,
        "bad_files": [{**b, "input": mask_uri(b["input"])} for b in plan.bad_inputs],
        "ids": plan.ids or {"checked": False},
        "prompt_tokens": prompts,
        "output_in_use_by": in_use_by,
        "warnings": plan.warnings,
        "seconds": plan.seconds,
    }


def summary_lines(d: dict) -> list[str]:
    """The plan summary (see `describe`), a line per topic; prompt lengths only when measured."""
    from .prompt_stats import prompt_lines

    lines = [f"{d['units']} unit(s) from {d['input_files']} input file(s), {d['rows']:,} rows: "
             f"{d['already_committed']} already committed, {d['to_run']} to run ({d['rows_to_run']:,} rows)"
             + (f", {len(d['stale'])} of them stale (their input changed)" if d["stale"] else "")
             + (f"; {len(d['bad_files'])} bad file(s) skipped" if d["bad_files"] else "")]
    lines += [f"! {b['input']}: {b['error']}" for b in d["bad_files"][:10]]
    lines += [f"! {w}" for w in d.get("warnings", ())]
    if d["overwrite"]:
        lines.append(f"--overwrite: {len(d['overwrite'])} committed output(s) are recomputed")
    ids = d["ids"]
    if ids.get("duplicate_rows") or ids.get("null_ids"):
        example = ids["examples"][0] if ids["examples"] else None
        lines.append(f"ids: {ids['duplicate_rows']:,} row(s) repeat an earlier id ({ids['duplicate_ids']:,} distinct), "
                     f"{ids['null_ids']:,} null: those rows get error set"
                     + (f" (e.g. id {example['id']} at {example['first']}, again at {example['again']})"
                        if example else ""))
    if d["prompt_tokens"]:
        lines += prompt_lines(d["prompt_tokens"])
    holder = d["output_in_use_by"]
    if holder:
        lines.append(f"! output in use by run {holder.get('run_id')} (host {holder.get('host')}, pid "
                     f"{holder.get('pid')}): a run started now would be refused until it ends")
    return lines


def _find_done(config: PipelineConfig, plan: Plan, write: bool = True) -> None:
    out = plan.output
    info = retry(lambda: out.fs.get_file_info(out.path), f"stat {out.uri}", out.retries)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output {out.uri} is a file; it must be a directory")
    if info.type == pafs.FileType.NotFound and out.scheme not in ("s3", "s3a"):
        return
    infos = retry(lambda: out.fs.get_file_info(pafs.FileSelector(out.path, allow_not_found=True)),
                  f"list {out.uri}", out.retries)
    existing = {i.base_name for i in infos if i.type == pafs.FileType.File
                and i.base_name.endswith((".parquet", ".jsonl")) and not i.base_name.startswith(("_", "."))}
    planned = {u.output_name for u in plan.units}
    stray = sorted(existing - planned)
    if stray:
        raise ConfigError(f"output {out.uri} holds {len(stray)} output file(s) this run would not "
                          f"write (e.g. {stray[:3]}): it belongs to another input or --rows-per-unit; "
                          f"use a new output directory")
    committed = sorted(existing & planned)
    if committed and not config.resume and not config.overwrite:
        raise ConfigError(f"output {out.uri} already holds {len(committed)} committed file(s); "
                          f"use --resume to finish the run or --overwrite to recompute")
    if config.overwrite:
        plan.overwritten = committed
        for name in committed if write else ():
            retry(lambda name=name: out.fs.delete_file(out.join(name).path), f"delete {out.join(name).uri}", out.retries)
            side = OUTPUT_FORMATS[config.output_format].sidecar(out.join(name))
            if side is not None:
                with contextlib.suppress(OSError):
                    out.fs.delete_file(side.path)
        return
    with ThreadPoolExecutor(16) as pool:
        stats = list(pool.map(lambda n: read_unit_stats(out.join(n)), committed))
    want = result_config(config)
    units_by_name = {u.output_name: u for u in plan.units}
    for name, st in zip(committed, stats):
        if st is None:
            continue
        got = st.get("result_config", {})
        diff = sorted(k for k in want if got.get(k) != want[k]
                      # the model's identity, when recorded, says more than how its path was spelled
                      and not (k == "model" and got.get("model_identity") is not None))
        if diff:
            shown = ", ".join(f"{k}={got.get(k)!r:.80} (now {want[k]!r:.80})" for k in diff)
            why = (" - the model's config, tokenizer or weights changed" if "model_identity" in diff else "")
            raise ConfigError(f"{mask_uri(out.join(name).uri)} was written with different settings: {shown}{why}; "
                              "use --overwrite to recompute, or a new output directory")
        unit = units_by_name[name]
        if st.get("input_fingerprint") != unit.fingerprint:  # same name, other data: redo it
            plan.stale.append({"output": name, "input": mask_uri(unit.input_uri),
                               "was": st.get("input_fingerprint"), "now": unit.fingerprint})
            continue
        plan.done[name] = st
        # a column of no type in it that later inputs typed: rewritten typed, so all read as one dataset
        if write:
            OUTPUT_FORMATS[config.output_format].conform(out.join(name), st, plan.schema)
