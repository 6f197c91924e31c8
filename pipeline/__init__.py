"""Ray Data batch inference for Persimmon: Parquet, JSONL, CSV or OpenAI batch files in, one
committed output file per unit of work (an input file, or a slice of one) out, plus
`_run_report.json`. See `pipeline.unit_runner` for the exactly-once design, and
`pipeline.processor` for the same tasks on any Ray Dataset (`build_processor`)."""

from .api import (build_report, check_model, dry_run, filesystem, init_ray, run, run_classify, run_generate, run_label,
                  run_score)
from .processor import Processor, build_dataset, build_processor
from .errors import ConfigError, InputError, ModelError
from .settings import PipelineConfig
from .stages import ClassifyStage, GenerateStage, LabelStage, ScoreStage

__all__ = [
    "ClassifyStage", "ConfigError", "GenerateStage", "InputError", "LabelStage", "ModelError",
    "PipelineConfig", "Processor", "ScoreStage", "build_dataset", "build_processor", "build_report", "check_model",
    "dry_run", "filesystem", "init_ray", "run", "run_classify", "run_generate", "run_label", "run_score",
]
