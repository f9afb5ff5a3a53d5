"""The command-line side of pipeline parallelism: ``--pipeline-stages`` / ``--pipeline-split`` /
``--pipeline-timeout`` on ``torchvlm generate`` and ``torchvlm serve`` (docs/distributed.md)."""

from __future__ import annotations

import argparse
import atexit
import os
import sys

from ..errors import ConfigError
from .launch import DEFAULT_TIMEOUT, PipelineError


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Add the pipeline flags to a subcommand's parser."""
    g = p.add_argument_group("pipeline parallelism (under torchrun; docs/distributed.md)")
    g.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                   help="split the model over N processes started by torchrun (one stage per rank)")
    g.add_argument("--pipeline-split", default=None, metavar="A,B,...",
                   help="decoder layers per stage (default: balanced by memory; the vision tower is on stage 0)")
    g.add_argument("--pipeline-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds a stage waits for a peer before failing (default {DEFAULT_TIMEOUT:g})")


def load_for_cli(ns: argparse.Namespace):
    """Rank 0: ``(model, processor)`` of the pipeline (closed at exit). Other ranks: serve their stage until
    rank 0 is done, then exit the process (status 0, or 1 with an ``error:`` line if a peer was lost)."""
    from .pipeline import load_pipeline, parse_split

    n = ns.pipeline_stages
    if getattr(ns, "quantize", None):
        raise ConfigError("--quantize does not combine with --pipeline-stages")
    if getattr(ns, "compile", False):
        raise ConfigError("--compile does not combine with --pipeline-stages")
    if getattr(ns, "num_beams", None) not in (None, 1):
        raise ConfigError("--num-beams does not combine with --pipeline-stages (greedy / sampling only)")
    pipe = load_pipeline(ns.model, stages=n, split=parse_split(ns.pipeline_split, n), dtype=ns.dtype,
                         device=ns.device, timeout=ns.pipeline_timeout, revision=ns.revision)
    if pipe.is_driver:
        atexit.register(_close, pipe)
        return pipe.model, pipe.processor
    try:
        pipe.run_worker()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: tearing it down (or interpreter exit with its threads) can hang
    pipe.close()
    raise SystemExit(0)


def _close(pipe) -> None:
    """At exit of rank 0: stop the other stages; after a lost peer, leave at once (status 1)."""
    pipe.close()
    if pipe.failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
