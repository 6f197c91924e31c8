"""Ray Data batch inference for Persimmon: Parquet shards in, one committed Parquet file per
shard out, plus `_run_report.json`. See `pipeline.runner` for the exactly-once design."""

from .api import (ModelError, build_dataset, build_report, check_model, dry_run, filesystem, init_ray, run,
                  run_classify, run_generate, run_label)
from .config import ConfigError, PipelineConfig
from .plan import InputError
from .stages import ClassifyStage, GenerateStage, LabelStage

__all__ = [
    "ClassifyStage", "ConfigError", "GenerateStage", "InputError", "LabelStage", "ModelError",
    "PipelineConfig", "build_dataset", "build_report", "check_model", "dry_run", "filesystem", "init_ray",
    "run", "run_classify", "run_generate", "run_label",
]
