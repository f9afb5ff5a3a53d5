"""``torchvlm bench``: the harness runs end to end on tiny checkpoints and writes well-formed JSON.

No timing is asserted (the machine is shared and noisy); only that every measurement is there and sane.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from torchvlm import bench
from torchvlm.models.base import VLM

HAVE_HF = importlib.util.find_spec("transformers") is not None


def test_bandwidth_probe_is_positive():
    bw = bench.measure_bandwidth(size_mb=8, repeats=2)
    assert bw["read_gbs"] > 0 and bw["copy_gbs"] > 0 and bw["threads"] >= 1


def test_end_to_end_json(llava_dir, tmp_path, capsys):
    """A real checkpoint directory (tokenizer + processor + vision): prompt from the chat template, one image,
    torchvlm and HF in fp32 in their own processes, same greedy tokens."""
    from torchvlm.cli import main

    out = tmp_path / "bench.json"
    engines = "torchvlm,hf,llama.cpp" if HAVE_HF else "torchvlm,llama.cpp"
    argv = ["bench", "--model", str(llava_dir), "--engines", engines, "--dtype", "fp32", "--quantize", "int8",
            "--new-tokens", "4", "--repeats", "1", "--bandwidth-mb", "8", "--cache-dir", str(tmp_path / "cache"),
            "--prompt", "What is it?", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "torchvlm fp32" in printed and "decode tok/s" in printed

    report = json.loads(out.read_text())
    assert report["schema_version"] == bench.SCHEMA_VERSION
    assert report["model"]["vision"] is True and report["model"]["family"] == "llava"
    assert report["machine"]["threads"] >= 1 and report["bandwidth"]["read_gbs"] > 0
    assert isinstance(report["machine"]["isa"], list) and "machine: " in printed
    w = report["workload"]
    assert w["new_tokens"] == 4 and w["prompt_tokens"] > 0 and w["image_prompt_tokens"] > w["prompt_tokens"]
    rows = {r["label"]: r for r in report["results"]}

    tv = rows["torchvlm fp32"]
    assert tv["status"] == "ok", tv.get("error")
    for key in ("load_s", "ttft_s", "ttft_image_s", "decode_tps", "peak_rss_mb", "bytes_per_token", "roofline_tps",
                "roofline_pct"):
        assert isinstance(tv[key], (int, float)) and tv[key] > 0, key
    assert len(tv["tokens"]) == 4 and len(tv["samples"]["ttft_s"]) == 1
    assert tv["peak_rss_mb"] >= tv["base_rss_mb"]

    q = rows["torchvlm int8"]
    assert q["status"] in ("ok", "skipped"), q.get("error")  # skipped until torchvlm.nn.quant exists

    lc = [r for r in report["results"] if r["engine"] == "llama.cpp"][0]
    assert lc["status"] == "skipped" and lc["error"]  # not a .gguf model (or not installed)

    if HAVE_HF:
        hf = rows["HF fp32"]
        assert hf["status"] == "ok", hf.get("error")
        assert hf["tokens"] == tv["tokens"]  # same weights, same prompt ids, fp32 greedy
        assert report["token_agreement"] == [
            {"engine": "torchvlm fp32", "vs": "HF fp32", "same": True, "first_difference": None}]
        # same decoder weights counted the same way (HF may hold a few extra buffers, e.g. rope tables)
        assert abs(hf["bytes_per_token"] - tv["bytes_per_token"]) <= 4096
        metrics = {(r["vs"], r["metric"]) for r in report["ratios"] if r["engine"] == "torchvlm fp32"}
        assert {("HF fp32", "decode"), ("HF fp32", "TTFT"), ("HF fp32", "TTFT with image")} <= metrics
        assert all(r["ratio"] > 0 and r["text"] for r in report["ratios"])


def test_synthetic_checkpoint_and_workload(tmp_path):
    """A synthetic model is built once (cached), loads in torchvlm, and its image prompt has exactly the
    model's number of image tokens."""
    path = bench.make_synthetic("tiny-llava", tmp_path)
    assert bench.make_synthetic("tiny-llava", tmp_path) == path  # cached
    model = VLM.from_pretrained(path, dtype="fp32")
    assert torch.isfinite(model.language_model.model.embed_tokens.weight).all()
    info = bench._describe(path, bench._model_config(path))
    work = bench._workload(path, info, True, "", 10, True, tmp_path)
    assert len(work["input_ids"]) == 10
    image_ids = work["image"]["input_ids"]
    assert image_ids.count(model.image_token_id) == model.num_image_tokens
    inputs = torch.load(work["image"]["inputs_file"])
    feats = model.encode_image(inputs["pixel_values"])
    assert feats.tokens.shape[1] == model.num_image_tokens


def test_decode_bytes_counts_the_head_once():
    """Tied: the embedding table is read as the LM head (counted once); untied: the input table is not read."""
    from torchvlm.models.text_lm import TextLM

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100}
    for tied in (True, False):
        model = TextLM.from_config({**cfg, "tie_word_embeddings": tied})
        lm = model.language_model
        emb = lm.model.embed_tokens.weight
        got = bench._decode_bytes(model, [emb], [emb] if lm.lm_head is None else [lm.lm_head.weight])
        every = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert got == (every if tied else every - emb.numel() * emb.element_size())


def test_bad_arguments_are_one_line_errors(capsys):
    from torchvlm.cli import main

    assert main(["bench", "--synthetic", "tiny", "--engines", "vllm"]) == 2
    assert "unknown engine" in capsys.readouterr().err
    assert bench.main(["--synthetic", "tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
    assert bench.main(["--synthetic", "tiny", "--concurrent", "1"]) == 2
    assert "--concurrent" in capsys.readouterr().err


def test_concurrent_requests_through_the_engine(tmp_path, capsys):
    """--concurrent N runs N requests at once through the continuous-batching engine in the torchvlm
    rows and reports their aggregate decode rate against the same row's batch-1 decode."""
    out = tmp_path / "bench.json"
    assert bench.main(["--synthetic", "tiny", "--engines", "torchvlm", "--dtype", "fp32", "--concurrent", "3",
                       "--new-tokens", "5", "--repeats", "1", "--bandwidth-mb", "8", "--cache-dir",
                       str(tmp_path / "cache"), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "torchvlm fp32: 3 concurrent requests (continuous batching): " in printed
    report = json.loads(out.read_text())
    assert report["workload"]["concurrent"] == 3
    row = report["results"][0]
    assert row["status"] == "ok", row.get("error")
    c = row["concurrent"]
    assert c["requests"] == 3 and c["decode_tps"] > 0 and c["total_tps"] > 0
    assert c["ratio"] == pytest.approx(c["decode_tps"] / row["decode_tps"])


def test_compiled_rows_time_the_compiled_engine_after_an_untimed_run(monkeypatch):
    """A compiled row's --concurrent runs go through Engine(compile=True): one untimed run first (it compiles
    the step; warmup_s), then the timed ones, and the ratio is against that row's (compiled) batch-1 rate."""
    calls = []

    def fake(model, prompts, params, compile=False):
        calls.append((len(prompts), params.max_new_tokens, compile))
        return {"tokens": {}, "total_s": 2.0, "first_step_tokens": 2 * len(prompts), "decode_tokens": 40,
                "decode_s": 1.0}

    monkeypatch.setattr(bench, "engine_timed", fake)
    res = {"decode_tps": 10.0}
    spec = {"concurrent": 4, "new_tokens": 11, "input_ids": [5, 6, 7], "repeats": 2, "compile": True}
    bench._concurrent_runs(None, spec, res)
    assert calls == [(4, 2, True), (4, 11, True), (4, 11, True)]
    c = res["concurrent"]
    assert c["warmup_s"] is not None and c["decode_tps"] == 40.0 and c["ratio"] == 4.0
    calls.clear()
    bench._concurrent_runs(None, dict(spec, compile=False), res)
    assert calls == [(4, 11, False)] * 2 and res["concurrent"]["warmup_s"] is None


def test_synthetic_qwen_vl_goes_through_its_processor(tmp_path):
    """Synthetic Qwen2-VL: saved with a processor whose special tokens the config points at; the image prompt
    comes from the processor (448x448 -> 256 image tokens) and its inputs run through the model."""
    path = bench.make_synthetic("tiny-qwen2-vl", tmp_path)
    model = VLM.from_pretrained(path, dtype="fp32")
    info = bench._describe(path, bench._model_config(path))
    assert info["vision_tower"]["layers"] == 2 and info["num_image_tokens"] is None
    work = bench._workload(path, info, True, "", 10, True, tmp_path)
    image_ids = torch.tensor([work["image"]["input_ids"]])
    assert int((image_ids == model.image_token_id).sum()) == 256
    inputs = torch.load(work["image"]["inputs_file"])
    assert set(inputs) == {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
    out = model.generate(image_ids, **inputs, max_new_tokens=2, ignore_eos=True)
    assert out.shape == (1, 2)
