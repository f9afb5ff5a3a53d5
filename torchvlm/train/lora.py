"""LoRA / QLoRA on torchvlm modules through ``peft``, and merging adapters into a plain checkpoint.

``peft``'s :class:`~peft.tuners.lora.LoraModel` works on any ``nn.Module``: it replaces the targeted
``nn.Linear`` layers in place by LoRA layers (``<name>.base_layer`` + ``lora_A`` / ``lora_B``), so the model
stays a torchvlm :class:`~torchvlm.models.base.VLM` with its own forward and loss. Targets are module name
suffixes matched inside the language model only (the vision tower uses the same ``q_proj`` names); the
default is every linear layer of the decoder blocks (attention and MLP), not the LM head.

Adapters are saved in peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``, keys named
after torchvlm modules); :func:`merge_lora` folds them into the base weights and returns the plain model,
which :meth:`VLM.save_pretrained` writes as an ordinary HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, TorchVLMError
from ..nn.fast import RelaidLinear

__all__ = ["require_train_extra", "lora_targets", "apply_lora", "save_adapter", "load_adapter", "merge_lora",
           "quantize_4bit", "is_lora_param", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_train_extra(*modules: str) -> None:
    """Raise a clear error when a package of the ``train`` extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TorchVLMError(f"fine-tuning needs the 'train' extra (missing: {', '.join(missing)}); "
                            "install it with: pip install 'torchvlm[train]'")


def is_lora_param(name: str) -> bool:
    """True for parameters peft adds (``lora_A``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude_*``)."""
    return ".lora_" in name


def lora_targets(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Full module names of the linear layers LoRA goes on.

    ``names`` are suffixes (``q_proj``, ``mlp.down_proj``, ...) matched against the linear layers of
    ``model.language_model``'s decoder blocks; None -> all of them. An unmatched name is an error.
    """
    layers = [(n, m) for n, m in model.named_modules()
              if n.startswith("language_model.model.layers.") and isinstance(m, nn.Linear)]
    if getattr(model, "quantized", None):
        raise ConfigError("LoRA: the model was quantized on load (int8/int4 kernels); load it with quantize=None")
    fused = [n for n, m in model.named_modules() if getattr(m, "qkv_proj", None) is not None]
    if fused or any(isinstance(m, RelaidLinear) for m in model.modules()):
        raise ConfigError("LoRA/training needs the plain layout: load the model with optimize=False "
                          "(fused q/k/v or prepacked weights found)")
    if not names:
        return [n for n, _ in layers]
    out = []
    for t in names:
        hit = [n for n, _ in layers if n == t or n.endswith("." + t)]
        if not hit:
            short = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
            raise ConfigError(f"--target-modules: '{t}' matches no linear layer of the language model "
                              f"(its layers have: {', '.join(short)})")
        out.extend(h for h in hit if h not in out)
    return out


def quantize_4bit(model: nn.Module, targets: list[str], compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace the ``targets`` linear layers by bitsandbytes NF4 ``Linear4bit`` layers (QLoRA's frozen base).

    Needs CUDA and ``bitsandbytes``: on CPU it raises, explaining why (use ``--mode lora``)."""
    if not torch.cuda.is_available():
        raise TorchVLMError("--mode qlora needs a CUDA GPU: its 4-bit NF4 base weights run on bitsandbytes' CUDA "
                            "kernels, which do not exist on CPU. On CPU use --mode lora (with --dtype bf16 to halve "
                            "the base model's memory)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TorchVLMError("--mode qlora needs bitsandbytes: pip install bitsandbytes")
    import bitsandbytes as bnb

    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, child, q.to("cuda"))


def apply_lora(model: nn.Module, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | None = None):
    """Inject LoRA adapters (peft) into ``model`` in place; only the adapter parameters stay trainable.

    Returns the peft ``LoraModel`` wrapper (``wrapper.model is model``). Adapter weights are kept in float32
    whatever the base dtype (the base stays frozen in its own dtype).
    """
    require_train_extra("peft")
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    targets = target_modules if target_modules and all("." in t and t.startswith("language_model.")
                                                       for t in target_modules) else lora_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    wrapper = LoraModel(model, config, "default")
    for name, p in model.named_parameters():
        if is_lora_param(name):
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    return wrapper


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(wrapper, out_dir: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft layout) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = wrapper.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = base_model
    cfg["torchvlm"] = True  # keys are torchvlm module names (not transformers')
    for k, v in list(cfg.items()):
        if isinstance(v, set):
            cfg[k] = sorted(v)
    save_file(_adapter_state(wrapper.model), str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike):
    """Inject the adapter saved in ``adapter_dir`` into ``model`` (as :func:`apply_lora`) and load its weights.
    A missing or unexpected adapter key is an error naming it."""
    require_train_extra("peft")
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / f).is_file():
            raise ConfigError(f"{d}: not a LoRA adapter directory ({f} is missing)")
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    wrapper = apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                         target_modules=list(cfg["target_modules"]))
    state = load_file(str(d / ADAPTER_WEIGHTS))
    expected = set(_adapter_state(model))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ConfigError(f"{d / ADAPTER_WEIGHTS}: adapter does not fit the model "
                          f"(missing: {missing[:3]}, unexpected: {extra[:3]})")
    set_peft_model_state_dict(model, state)
    return wrapper


def merge_lora(wrapper) -> nn.Module:
    """Fold the adapters into the base weights and remove the LoRA layers; returns the plain model."""
    model = wrapper.merge_and_unload()
    model.requires_grad_(False)
    return model
