"""Lazy Datasets of results to compose with your own Ray Data steps (README "Ray Data processor"):
`build_processor` runs a task on any `ray.data.Dataset`, `build_dataset` on a run's input files.

    processor = build_processor("generate", model="/models/p8b", replicas=2, max_new_tokens=64,
                                preprocess=lambda row: {"id": row["idx"], "prompt": row["text"]})
    processor(ray.data.read_json("s3://b/questions/")).write_parquet("s3://b/answers/")

It adds ds -> map_batches(ReplicaStage, ActorPoolStrategy(--replicas)) -> map(postprocess). What
can go wrong:
- a setting, the model or an attachment that cannot work: `build_processor` raises on the
  driver (ConfigError, ModelError), having run a run's checks; no replica starts;
- `preprocess` raising on a row, or not returning a dict: a `preprocess_error` row (id kept);
- a prompt that cannot run: a row with its error, as in a run;
- rows without the prompt column (after preprocess): the Dataset fails, naming it;
- a replica that cannot start, or `postprocess` raising: the Dataset fails, as Ray Data's would.
A batch is re-run after its replica dies and each consumption runs the model again: for
exactly-once, resumable output files use `pipeline.run`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import pyarrow as pa

from .api import _checked, _compute, _context_values, _map_batches, init_ray
from .errors import ConfigError, InputError, RowError, one_line
from .formats import input_format
from .plan import list_inputs
from .settings import PipelineConfig
from .stages import TASKS, column_values
from .storage import resolve

RowFn = Callable[[dict], dict]


def build_processor(task: str, model: str | None = None, preprocess: RowFn | None = None,
                    postprocess: RowFn | None = None, **settings) -> Processor:
    """`processor(ds)`: the lazy Dataset of `ds`'s results. `settings`: `PipelineConfig` fields less
    `RUN_FIELDS`; `preprocess(row)` makes a row with the prompt column (and optionally the id,
    keep_columns and per-row settings); `postprocess(row)` maps each result row."""
    return Processor(PipelineConfig.for_processor(task, model=model, **settings), preprocess, postprocess)


class Processor:
    """`processor(ds) -> ds` for a checked config; reusable, each Dataset getting its own replica pool."""

    def __init__(self, config: PipelineConfig, preprocess: RowFn | None = None, postprocess: RowFn | None = None):
        self.config = _checked(config, run=False)
        self.preprocess, self.postprocess = preprocess, postprocess
        init_ray(self.config)

    def __call__(self, ds):
        out = self.on_replicas(ds, ReplicaStage, self.config.batch_size, preprocess=self.preprocess)
        return out if self.postprocess is None else out.map(self.postprocess)

    def on_replicas(self, ds, cls, batch_size: int, **kwargs):
        """`ds.map_batches(cls(config, **kwargs))` on this config's replica pool: its size, resources,
        retries and DataContext settings (`api._context_values`)."""
        import ray.data

        # a derived Dataset shares its DataContext (Ray 2.60): the pool's settings go on a copy's
        with warnings.catch_warnings():  # deep-copying a DataContext sets its deprecated fields too
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.Dataset.copy(ds, _deep_copy=True)
        for key, value in _context_values(self.config, ds.context).items():
            setattr(ds.context, key, value)
        return _map_batches(ds, cls, self.config, fn_constructor_kwargs={"config": self.config, **kwargs},
                            batch_format="pyarrow", batch_size=batch_size, compute=_compute(self.config))


class ReplicaStage:
    """A processor's replica: batch -> `preprocess` row by row (if given) -> the task's stage -> results.
    Callable without Ray (`engine=` a test double or an Engine)."""

    def __init__(self, config: PipelineConfig, preprocess: RowFn | None = None, engine=None):
        self.config, self.preprocess = config, preprocess
        self.stage = TASKS[config.task](config, engine=engine)

    def __call__(self, batch) -> pa.Table:
        cfg = self.config
        if self.preprocess is None:
            self._require(batch.column_names, "the Dataset's rows")
            if cfg.id_column not in batch.column_names:
                batch = batch.append_column(cfg.id_column, pa.nulls(batch.num_rows))
            return self.stage(batch)
        columns, row_errors = self._preprocessed(batch)
        return self.stage(columns, row_errors)

    def _preprocessed(self, batch: pa.Table) -> tuple[dict[str, list], dict[int, RowError]]:
        """The batch through `preprocess`: the columns the stage reads ({name: values}, None where a row
        lacks one) and the rows preprocess failed ({row index: error})."""
        cfg = self.config
        names = batch.column_names
        rows = [dict(zip(names, values)) for values in zip(*(column_values(batch[c]) for c in names))]
        made, errors = [], {}
        for i, row in enumerate(rows):
            try:
                new = self.preprocess(row)
                if not isinstance(new, Mapping):
                    raise TypeError(f"preprocess returned a {type(new).__name__}, not a row (a dict)")
            except Exception as e:  # noqa: BLE001 - the row's error, never the Dataset's
                errors[i] = RowError("preprocess_error", one_line(f"{type(e).__name__}: {e}"))
                new = {cfg.id_column: row.get(cfg.id_column)}
            made.append(new)
        keys = {k for i, r in enumerate(made) if i not in errors for k in r}
        if len(errors) < len(made):
            self._require(keys, "preprocess's rows")
        wanted = dict.fromkeys([cfg.id_column, cfg.prompt_column, *cfg.keep_columns])
        wanted.update((c, None) for c in self.stage.input_columns(cfg) if c in keys)
        return {c: [r.get(c) for r in made] for c in wanted}, errors

    def _require(self, columns, what: str) -> None:
        cfg = self.config
        for col in (cfg.prompt_column, *cfg.keep_columns):
            if col not in columns:
                hint = ("set prompt_column= to the column that holds it, or make it with preprocess="
                        if col == cfg.prompt_column else "keep_columns names columns every row has")
                raise ValueError(f"{what} have no {col!r} column (they have {sorted(columns)}): {hint}")


# ---- the input files as a Dataset ------------------------------------------------------------
def build_dataset(config: PipelineConfig, ds=None):
    """Lazy Dataset of results of the input files, each read by a replica as a run reads it (`FileStage`;
    an unreadable row is a row with its error); `ds`: of your own Dataset instead. Write it with
    `filesystem=pipeline.filesystem(config, uri)` for object stores with an endpoint."""
    import ray.data

    processor = Processor(config)
    if ds is not None:
        return processor(ds)
    config = processor.config
    if not config.input:
        raise ConfigError("input: is required (or pass ds=, a Dataset of rows)")
    files = [f.loc.uri for f in list_inputs(config.input, config)]
    ds = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=len(files))
    return processor.on_replicas(ds, FileStage, batch_size=1)


class FileStage:
    """`build_dataset`'s replica: input file URIs in, their rows' results out, a batch at a time; a bad
    file (not its format, no prompt column, empty) fails the Dataset with a message naming it."""

    def __init__(self, config: PipelineConfig):
        self.config, self.stage = config, TASKS[config.task](config)
        self.columns = self.stage.read_columns(config)

    def __call__(self, batch):
        for uri in batch["uri"].to_pylist():
            loc = resolve(uri, self.config)
            fmt = input_format(loc.path, self.config.input_format)
            found = fmt.inspect(loc, self.config)
            if found.problem is not None:
                raise InputError(f"{uri}: {found.problem}")
            for split in found.splits:
                for table, read_errors in fmt.batches(loc, split, self.config, self.columns):
                    yield self.stage(table, read_errors)
