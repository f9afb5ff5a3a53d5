"""Scale out on ``torch.distributed`` (launched by ``torchrun``): pipeline-parallel inference across processes
and hosts (:mod:`.pipeline`) and the launch helpers of data-parallel fine-tuning (:mod:`.launch`).
See docs/distributed.md."""

from .launch import DistEnv, PipelineError, dist_env, init_distributed

__all__ = ["DistEnv", "PipelineError", "dist_env", "init_distributed", "load_pipeline", "pipeline_generate",
           "plan_split"]


def __getattr__(name):  # the pipeline module is imported on first use
    if name in ("load_pipeline", "pipeline_generate", "plan_split", "Pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
