"""Pipeline-parallel inference on localhost (gloo): same greedy tokens as one process, per-rank memory about its
share of the weights, the CLI under torchrun, bad input, and a killed rank ending the job quickly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_util import HERE, child_env, free_port, run, torchrun
from torchvlm.errors import ConfigError

SCRIPT = str(HERE / "pipeline_run.py")
MB = 2**20


@pytest.fixture(scope="module")
def reference(big_llava):
    """Greedy tokens of the prompt batch in one process, and the weight bytes per checkpoint key."""
    import prompts

    import torchvlm
    from torchvlm.generation.loop import generate
    from torchvlm.loading import SafetensorsSource

    model, processor = torchvlm.load(big_llava, dtype="fp32")
    batch = prompts.batch(processor)
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # rows of different lengths: left padding
    seqs = generate(model, **batch, max_new_tokens=6, temperature=0.0).sequences.tolist()
    src = SafetensorsSource(big_llava)
    sizes = {k: src.nbytes(k) for k in src.keys()}
    src.close()
    return seqs, sizes


def _stage_bytes(sizes: dict, layers: list[list[int]]) -> list[int]:
    out = [0] * len(layers)
    owner = {i: s for s, ids in enumerate(layers) for i in ids}
    for key, n in sizes.items():
        m = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", key)
        if m and "vision" not in key:
            out[owner[int(m.group(1))]] += n
        elif key.endswith(("language_model.norm.weight", "language_model.model.norm.weight", "lm_head.weight")):
            out[-1] += n
        else:
            out[0] += n
    return out


def _results(out, n):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.parametrize("n, split, micro", [(2, None, 2), (3, "4,8,4", 4)])
def test_pipeline_matches_one_process_and_each_rank_holds_its_share(big_llava, reference, tmp_path, n, split, micro):
    seqs, sizes = reference
    args = [SCRIPT, str(big_llava), str(tmp_path), "--micro-batches", str(micro)]
    if split:
        args += ["--split", split]
    t0 = time.monotonic()
    proc = run(torchrun(n, *args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _results(tmp_path, n)
    assert res[0]["sequences"] == seqs  # token for token
    layers = res[0]["layers"]
    if split:
        assert [len(r) for r in layers] == [4, 8, 4]
    else:
        assert [len(r) for r in layers] == [8, 8]  # balanced by memory
    total = sum(sizes.values())
    share = _stage_bytes(sizes, layers)
    for r, rec in enumerate(res):
        grown = (rec["peak_rss_kb"] - rec["rss_before_kb"]) * 1024
        print(f"{n} stages, rank {r}: peak RSS +{grown / MB:.0f} MB for {share[r] / MB:.0f} MB of its weights "
              f"(whole model {total / MB:.0f} MB); run {time.monotonic() - t0:.1f}s")
        # its weights plus a fixed overhead (rank 0: the processor, images, the generate loop's state and the
        # micro-batch threads: 50-80 MB measured, depending on the machine and its load)
        assert grown <= share[r] + (96 if r == 0 else 48) * MB, (r, grown / MB, share[r] / MB)
        assert grown < total  # never the whole model
        if r:
            assert grown < share[r] + (total - share[r]) / 2  # far nearer its share than the whole model


def test_qwen3_vl_deepstack_mrope_tied_over_three_stages(qwen3_vl_tied, tmp_path):
    """One decoder layer per stage: the DeepStack additions of layers 0 and 1 travel with the hidden states,
    3-d rope positions go along, the last stage holds a copy of the tied embeddings."""
    import prompts

    from torchvlm.generation.loop import generate
    from torchvlm.models.base import VLM

    model = VLM.from_pretrained(qwen3_vl_tied, dtype=torch.float32)
    want = generate(model, **prompts.qwen_vl_batch(), max_new_tokens=6).sequences.tolist()
    assert len({t for row in want for t in row}) > 3
    proc = run(torchrun(3, SCRIPT, str(qwen3_vl_tied), str(tmp_path), "--qwen"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(tmp_path, 3)
    assert res[0]["layers"] == [[0], [1], [2]]
    assert res[0]["sequences"] == want


def test_cli_generate_under_torchrun_prints_the_single_process_answer(big_llava, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(image)
    common = ["generate", "--model", str(big_llava), "--image", str(image), "--prompt", "What is shown?",
              "--max-new-tokens", "8", "--dtype", "fp32"]
    from torchvlm.cli import main

    assert main(common) == 0
    single = capsys.readouterr().out
    piped = run(torchrun(2, "-m", "torchvlm.cli", *common, "--pipeline-stages", "2", "--pipeline-split", "5,11"))
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout == single and single.strip()  # only rank 0 prints


def test_bad_input_is_named():
    from torchvlm.distributed.pipeline import parse_split, plan_split

    with pytest.raises(ConfigError, match="more stages than the model's 2 decoder layers"):
        plan_split([1, 1], 3)
    with pytest.raises(ConfigError, match="add up to the model's 4 decoder layers"):
        plan_split([1, 1, 1, 1], 2, split=[1, 2])
    with pytest.raises(ConfigError, match="gives 3 stages, --pipeline-stages is 2"):
        parse_split("1,1,2", 2)
    with pytest.raises(ConfigError, match=">= 2"):
        plan_split([1, 1], 1)
    # the largest stage is as small as it can be: extras on the first / last stage count
    assert [len(r) for r in plan_split([10] * 8, 2)] == [4, 4]
    assert [len(r) for r in plan_split([10] * 8, 2, first_extra=40)] == [2, 6]
    assert [len(r) for r in plan_split([10] * 9, 3, last_extra=30)] == [4, 4, 1]


def test_pipeline_outside_torchrun_says_how_to_launch(tied_qwen2, monkeypatch):
    from torchvlm.distributed.pipeline import load_pipeline

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        load_pipeline(tied_qwen2, stages=2)
    proc = run([sys.executable, "-m", "torchvlm.cli", "generate", "--model", str(tied_qwen2), "--prompt", "hi",
                "--pipeline-stages", "2"], timeout=60)
    assert proc.returncode == 2 and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
    wrong = run(torchrun(2, "-m", "torchvlm.cli", "generate", "--model", str(tied_qwen2), "--prompt", "hi",
                         "--pipeline-stages", "3"), timeout=60)
    assert wrong.returncode != 0 and "3 stages need 3 processes, but torchrun started 2" in wrong.stderr


def _launch(out, n, timeout=20):
    """Ranks started directly (no torchrun, so that nothing else kills them), rank 0 generating forever."""
    port = free_port()
    return [subprocess.Popen([sys.executable, SCRIPT, str(out[0]), str(out[1]), "--text", "--hang", "--timeout",
                              str(timeout)],
                             env=child_env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]


def _wait_ready(out, procs, limit=90):
    t0 = time.monotonic()
    while not (out / "ready").exists():
        assert time.monotonic() - t0 < limit and all(p.poll() is None for p in procs), "pipeline did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # a few generate steps in flight


def test_killing_a_stage_ends_the_others_with_an_error_naming_it(tied_qwen2, tmp_path):
    procs = _launch((tied_qwen2, tmp_path), 3)
    try:
        _wait_ready(tmp_path, procs)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
        t0 = time.monotonic()
        outs = {}
        for r in (0, 2):
            outs[r], _ = procs[r].communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert elapsed < 30, elapsed
    for r in (0, 2):
        assert procs[r].returncode not in (0, None)
    # stage 2 sees stage 1 go; rank 0 may first see stage 2 exit because of it: either is named, clearly
    assert "pipeline stage 1 (rank 1)" in outs[2], outs[2][-2000:]
    assert re.search(r"pipeline stage [12] \(rank [12]\)", outs[0]), outs[0][-2000:]


def test_a_hung_stage_fails_the_driver_within_the_timeout(tied_qwen2, tmp_path):
    procs = _launch((tied_qwen2, tmp_path), 2, timeout=5)
    pid = None
    try:
        _wait_ready(tmp_path, procs)
        pid = int((tmp_path / "pid1").read_text())
        os.kill(pid, signal.SIGSTOP)  # alive (its sockets open) but silent
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode not in (0, None) and elapsed < 5 + 10, elapsed
    assert "pipeline stage 1 (rank 1): no answer within the timeout" in out, out[-2000:]


def test_torchrun_job_fails_fast_when_a_rank_is_killed(tied_qwen2, tmp_path):
    proc = subprocess.Popen(torchrun(2, SCRIPT, str(tied_qwen2), str(tmp_path), "--text", "--hang", "--timeout", "20"),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(tmp_path, [proc])
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
    assert "pipeline stage 1 (rank 1)" in out or "rank      : 1" in out, out[-3000:]


def test_stage_cache_is_used_whole():
    from torchvlm.distributed.pipeline import StageCache
    from torchvlm.errors import GenerationError

    cache = StageCache(1, 4, range(1, 3), 2, 8, 2, 4, dtype=torch.float32)
    assert cache.k[0].numel() == 0 and cache.k[1].shape == (2, 2, 8, 4)
    assert cache.rows(slice(0, 2)) is cache
    with pytest.raises(GenerationError, match="used whole"):
        cache.rows(0)
    with pytest.raises(GenerationError, match="beam search"):
        cache.k = [k.index_select(0, torch.tensor([1, 0])) for k in cache.k]
