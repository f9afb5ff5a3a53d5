"""The ``torchvlm`` command line: ``generate``, ``chat``, ``info``, ``bench``, ``serve``, ``finetune``, ``merge-lora``.

User errors (missing model, bad image, bad argument) print one ``error: ...`` line and exit with status 2;
no stack trace. ``TORCHVLM_DEBUG=1`` shows the trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from .bench import add_bench_parser
from .distributed.cli import add_pipeline_args
from .errors import TorchVLMError
from .features import add_embed_parser
from .serve.cli import add_serve_parser
from .train.cli import add_train_parsers


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="local directory, .gguf file or hub id (default: the embedded demo model, a tiny VLM "
                        "for pictures of coloured shapes that ships with torchvlm; docs/demo-model.md)")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32 (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization of the language model (faster decode on CPU)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="load the plain model: no fused projections / prepacked bf16 weights (same results)")
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd step: faster tokens after about a minute of compilation")


def _sampling(ns: argparse.Namespace) -> dict:
    return dict(
        compile=getattr(ns, "compile", False),
        max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
        min_p=ns.min_p, repetition_penalty=ns.repetition_penalty, seed=ns.seed, stop=tuple(ns.stop),
        **({"num_beams": ns.num_beams} if getattr(ns, "num_beams", None) is not None else {}),
    )


def _default_model(ns: argparse.Namespace) -> None:
    """No ``--model``: use the embedded demo model (:func:`torchvlm.demo.default_model_path`)."""
    if getattr(ns, "model", None) is None:
        from .demo import default_model_path

        ns.model = str(default_model_path())


def _load(ns: argparse.Namespace):
    from .api import load

    _default_model(ns)
    t0 = time.perf_counter()
    if getattr(ns, "pipeline_stages", None):  # under torchrun; ranks > 0 serve their stage and exit here
        from .distributed.cli import load_for_cli

        return load_for_cli(ns)
    model, processor = load(ns.model, dtype=ns.dtype, device=ns.device, revision=ns.revision,
                            quantize=ns.quantize, optimize=getattr(ns, "optimize", True))
    if getattr(ns, "verbose", False):
        print(f"loaded {ns.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, processor


def cmd_generate(ns: argparse.Namespace) -> int:
    """``torchvlm generate``: answer one prompt (with optional images) and print the answer."""
    from .api import build_messages, generate, stream_generate

    if getattr(ns, "task", None) is not None:
        return _run_task(ns)
    if ns.prompt is None:
        raise TorchVLMError("--prompt is required (or --task for models with task prompts)")
    if getattr(ns, "text", None) is not None:
        raise TorchVLMError("--text is the input of a --task; without --task use --prompt")
    model, processor = _load(ns)
    images, videos = list(ns.image or []), list(ns.video or [])
    if images and model.image_token_id is None:
        raise TorchVLMError(f"model '{ns.model}' is text-only; it takes no --image")
    if videos and model.video_token_id is None:
        raise TorchVLMError(f"model '{ns.model}' takes no --video (video-capable families: Qwen2-VL, Qwen2.5-VL, "
                            "Qwen3-VL)")
    # a chat (images first, then the prompt) rendered with the checkpoint's template, or the raw prompt
    if ns.raw:
        prompt, media = ns.prompt, {"images": images, "videos": videos}
    else:
        prompt, media = build_messages(ns.prompt, images, ns.system, videos=videos), {}
    kwargs = {**_sampling(ns), **media}
    if ns.stream:
        for delta in stream_generate(model, processor, prompt, chat=not ns.raw, **kwargs):
            print(delta, end="", flush=True)
        print()
    else:
        print(generate(model, processor, prompt, chat=not ns.raw, **kwargs))
    return 0


def _run_task(ns: argparse.Namespace) -> int:
    """``torchvlm generate --task T --image I [--text X]``: print the task's answer (text, or one line of JSON)."""
    from .api import processor_tasks, run_task

    for flag, value in (("--prompt", ns.prompt), ("--video", ns.video), ("--system", ns.system),
                        ("--stream", ns.stream or None)):
        if value:
            hint = " (give the task's text input with --text)" if flag == "--prompt" else ""
            raise TorchVLMError(f"{flag} cannot be used with --task{hint}")
    images = list(ns.image or [])
    if len(images) != 1:
        raise TorchVLMError(f"--task needs exactly one --image, got {len(images)}")
    model, processor = _load(ns)
    tasks = processor_tasks(processor)
    if not tasks:
        raise TorchVLMError(f"--task: model '{ns.model}' has no task prompts ({type(processor).__name__}); "
                            "ask with --prompt instead")
    processor.task_prompt(ns.task, ns.text)  # unknown task / missing or unexpected --text: fail before generating
    answer = run_task(model, processor, ns.task, images[0], text=ns.text, **_sampling(ns))
    print(answer if isinstance(answer, str) else json.dumps(answer))
    return 0


def cmd_chat(ns: argparse.Namespace, stdin=None, stdout=None) -> int:
    """A REPL: type a message; ``/image PATH`` attaches an image to the next message, ``/clear`` starts over,
    ``/quit`` (or EOF) leaves."""
    from .api import stream_generate
    from .processing.image import load_image

    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    model, processor = _load(ns)
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    pending: list = []
    kwargs = _sampling(ns)
    print("torchvlm chat: /image PATH to attach an image, /clear to reset, /quit to leave", file=out)
    while True:
        print(">>> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/clear":
            history = history[:1] if ns.system else []
            pending = []
            print("(history cleared)", file=out)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if model.image_token_id is None:
                print("error: this model is text-only; it takes no images", file=out)
                continue
            try:
                pending.append(load_image(path))
            except TorchVLMError as e:
                print(f"error: {e}", file=out)
                continue
            print(f"(image attached: {path})", file=out)
            continue
        if line.startswith("/"):
            print(f"error: unknown command '{line.split()[0]}' (use /image PATH, /clear, /quit)", file=out)
            continue
        content = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": line}]
        history.append({"role": "user", "content": content if pending else line})
        pending = []
        answer = []
        try:
            for delta in stream_generate(model, processor, history, **kwargs):
                answer.append(delta)
                print(delta, end="", file=out, flush=True)
        except TorchVLMError as e:
            history.pop()
            print(f"error: {e}", file=out)
            continue
        print(file=out)
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    """Describe a checkpoint without loading its weights."""
    from . import registry
    from .hub import read_config, resolve_model_path

    path = resolve_model_path(ns.model, revision=ns.revision, config_only=True)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import gguf_config

        config, where = gguf_config(path), path.name
    else:
        config, where = read_config(path), str(path / "config.json")
    family = registry.family_of(config, where)
    cls = registry.model_class(config, where)
    if path.is_dir():
        config = cls.checkpoint_config(config, path)
    import torch

    with torch.device("meta"):
        model = cls.from_config(config, where=where)
    text = model.text_config
    info = {
        "path": str(path),
        "family": family,
        "class": cls.__name__,
        "parameters": model.num_parameters(),
        "vision": model.vision_tower is not None,
        "text": {
            "layers": text.num_hidden_layers, "hidden_size": text.hidden_size, "heads": text.num_attention_heads,
            "kv_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
        },
    }
    if getattr(model, "vision_config", None) is not None:
        v = model.vision_config
        info["vision_tower"] = {"type": v.model_type, "image_size": v.image_size, "patch_size": v.patch_size,
                                "layers": v.num_hidden_layers, "hidden_size": v.hidden_size}
    if ns.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v if not isinstance(v, dict) else ', '.join(f'{a}={b}' for a, b in v.items())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchvlm`` command."""
    from . import __version__

    p = argparse.ArgumentParser(prog="torchvlm", description="Pure-PyTorch vision-language models.")
    p.add_argument("--version", action="version", version=f"torchvlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt (with optional images)")
    _model_args(g)
    g.add_argument("--prompt", "-p", default=None, help="the question / instruction (required unless --task)")
    g.add_argument("--task", default=None,
                   help="run a task of a model with task prompts (Florence-2: OD, CAPTION, OCR_WITH_REGION, ...) on "
                        "one --image; structured answers print as JSON")
    g.add_argument("--text", default=None, help="the --task's text input, for tasks that take one")
    g.add_argument("--num-beams", type=int, default=None,
                   help="beam search width (greedy, not streamable); default: the model's generation config")
    g.add_argument("--image", "-i", action="append", help="image path / URL-less source (repeatable)")
    g.add_argument("--video", action="append", help="video file (repeatable; Qwen-VL models; needs torchvlm[video])")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--verbose", "-v", action="store_true")
    _sampling_args(g)
    add_pipeline_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (/image PATH, /clear, /quit)")
    _model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--verbose", "-v", action="store_true")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="describe a checkpoint (no weights loaded)")
    i.add_argument("model", help="local directory, .gguf file or hub id")
    i.add_argument("--revision", default=None)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    add_bench_parser(sub)
    add_serve_parser(sub)
    add_train_parsers(sub)
    add_embed_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchvlm`` command."""
    return run_command(build_parser().parse_args(argv))


def run_command(ns: argparse.Namespace) -> int:
    """Run a parsed command; a user error becomes one ``error: ...`` line and exit status 2."""
    try:
        return ns.func(ns)
    except TorchVLMError as e:
        if os.environ.get("TORCHVLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
