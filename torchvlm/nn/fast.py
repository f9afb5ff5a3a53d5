"""Inference layouts of a loaded model: fused projections and prepacked CPU weights.

Both are post-load transforms of a model whose weights were loaded under their Hugging Face names; neither
changes what the model computes (tests/unit/test_fast_paths.py):

- :func:`fuse_projections`: the q/k/v projections of every text-decoder attention become one ``qkv_proj``
  Linear, and the gate/up projections of every gated MLP one ``gate_up_proj`` (one GEMM instead of three
  and two). Exact: each output element is the same dot product. ``state_dict()`` still reports (and
  ``load_state_dict()`` still takes) the HF names ``q_proj`` / ``k_proj`` / ``v_proj`` / ``gate_proj`` /
  ``up_proj``, so ``save_pretrained`` writes an ordinary checkpoint. Quantize *after* fusing: a fused layer
  is then quantized as one (int8/int4 scales are per output row or row group, so the codes are those of the
  separate layers).
- :func:`pack_linears`: bf16/fp16 ``nn.Linear`` layers on the CPU keep their weight in oneDNN's blocked
  layout (:class:`PackedLinear`), which the oneDNN matmul reads about twice as fast for the few-row
  products of a decode step as a plain ``F.linear`` (which re-lays the weight out on each call). Bit-identical
  results (same kernel). Inference only: the packed weight is no parameter (no gradient, ``model.to(dtype)``
  does not convert it); ``state_dict()`` unpacks it under the usual ``weight`` name. On CPUs without
  oneDNN bf16/fp16 GEMMs (AVX2-only), the layers become :class:`PanelLinear` instead: the weight in panels of
  16 output rows for a C++ kernel (:mod:`torchvlm.nn.cpu_kernel`) that multiplies in float32, prefill-sized
  products too; rounded as bf16 products are, not bit-identical. Where that kernel cannot be built they
  become :class:`UpcastLinear` (prefill-sized products as a float32 GEMM, 5-8x faster there than bf16).

:func:`optimize_for_inference` applies both. docs/performance.md has the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_kernel import (
    decode_kernels_available,
    kernel_available,
    lowp_linear,
    pack_panels,
    panel_kernel_available,
    panel_linear,
    panel_rows,
    records_grad,
    unpack_panels,
)

__all__ = ["RelaidLinear", "PackedLinear", "PanelLinear", "PanelEmbedding", "UpcastLinear", "upcast_linear",
           "fuse_projections", "pack_linears", "optimize_for_inference", "can_pack", "stored_weight"]

_PACK_DTYPES = (torch.bfloat16, torch.float16)

#: Fewest rows (tokens) of a product that :class:`UpcastLinear` runs in float32 (fewer: the C++ kernel, which
#: measured faster up to ~44 rows on SmolLM2's layers and ~64 on Qwen2-1.5B's, 2 AVX2 cores).
UPCAST_MIN_ROWS = 40
#: Weights upcast at a time for products of fewer than :data:`UPCAST_WHOLE_ROWS` rows: a 4 MB float32 block
#: stays in cache for its GEMM, where a whole large copy is written to memory (and page-faulted) first:
#: Qwen2-1.5B's layers at 128 rows 640 -> 327 ms. Larger products upcast whole weights: their GEMMs
#: dominate and run faster whole (a ViT's 1024 rows: 672 vs 711-770 ms in blocks). :class:`PanelLinear`
#: runs its kernel below :data:`UPCAST_WHOLE_ROWS` rows (it measured faster than the upcast GEMMs up to
#: there: SmolLM2's layers at 256 rows 431 vs 466 ms, Qwen2-1.5B's at 512 rows 1285 vs 1681 ms) and
#: upcasts whole weights from there on.
UPCAST_BLOCK = 1 << 20
UPCAST_WHOLE_ROWS = 512


# ---------------------------------------------------------------------------------------------- fusion
def _cat_linears(linears: list[nn.Linear]) -> nn.Linear:
    w0, b0 = linears[0].weight, linears[0].bias
    # built on the meta device: nn.Linear's own random init of a fresh weight took most of the fusing time
    # (Qwen2-VL-2B: 9.7 -> 1.9 s); the concatenation is the only copy
    fused = nn.Linear(w0.shape[1], sum(lin.out_features for lin in linears), bias=b0 is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), w0.requires_grad)
    if b0 is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), b0.requires_grad)
    return fused


def _fusable(linears: list) -> bool:
    if not all(type(lin) is nn.Linear for lin in linears):  # quantized / packed / missing: leave alone
        return False
    w = [lin.weight for lin in linears]
    return (not any(t.is_meta for t in w) and len({(t.dtype, t.device, t.shape[1]) for t in w}) == 1
            and len({lin.bias is None for lin in linears}) == 1)


def _split_hook(fused: str, parts: tuple[str, ...], sizes: list[int]):
    """state_dict post hook: ``<fused>.weight/bias`` -> the parts' HF names."""

    def hook(module, state_dict, prefix, local_metadata):
        for kind in ("weight", "bias"):
            key = f"{prefix}{fused}.{kind}"
            if key not in state_dict:
                continue
            for name, chunk in zip(parts, state_dict.pop(key).split(sizes, dim=0)):
                state_dict[f"{prefix}{name}.{kind}"] = chunk

    return hook


def _join_hook(fused: str, parts: tuple[str, ...]):
    """load_state_dict pre hook: the parts' HF names -> ``<fused>.weight/bias``."""

    def hook(module, state_dict, prefix, *args):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])

    return hook


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` in every text-decoder attention and
    gated MLP of ``model`` (in place; returns ``model``). Layers that are already fused, quantized or not
    plain float ``nn.Linear`` are left as they are. See the module docstring."""
    from ..text.decoder import Attention
    from .mlp import GatedMLP

    # hold only the parents: a list of every module would keep each replaced q/k/v/gate/up weight alive until
    # the end, i.e. the whole decoder twice in memory at the peak (1.5x the weights for Qwen2-VL-2B)
    for module in [m for m in model.modules() if isinstance(m, (Attention, GatedMLP))]:
        if isinstance(module, Attention):
            fused, parts = "qkv_proj", ("q_proj", "k_proj", "v_proj")
        elif isinstance(module, GatedMLP):
            fused, parts = "gate_up_proj", ("gate_proj", "up_proj")
        else:
            continue
        linears = [getattr(module, name, None) for name in parts]
        if getattr(module, fused, None) is not None or not _fusable(linears):
            continue
        sizes = [lin.out_features for lin in linears]
        setattr(module, fused, _cat_linears(linears))
        for name in parts:
            delattr(module, name)
        module.register_state_dict_post_hook(_split_hook(fused, parts, sizes))
        module.register_load_state_dict_pre_hook(_join_hook(fused, parts))
    return model


# ---------------------------------------------------------------------------------------------- packing
def can_pack(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this PyTorch build can prepack ``dtype`` linear weights for oneDNN on the CPU."""
    if dtype not in _PACK_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        if dtype is torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
            return False
        if dtype is torch.float16 and not ops._is_mkldnn_fp16_supported():
            return False
        w = torch.ones(16, 16, dtype=dtype)
        y = ops._linear_pointwise(torch.ones(1, 16, dtype=dtype), ops._reorder_linear_weight(w, 1), None,
                                  "none", [], "")
        return bool((y == 16).all())
    except (AttributeError, RuntimeError):
        return False


class RelaidLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is kept in another layout: a non-persistent buffer
    (``_layout_name``) that ``state_dict()`` gives back as the plain ``weight`` and ``load_state_dict``
    re-lays out, so checkpoints keep the ``nn.Linear`` form. Subclasses say how (``_lay_out``, ``_plain``)."""

    _layout_name = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer(self._layout_name, self._lay_out(linear.weight.detach()), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_state_dict_post_hook(RelaidLinear._plain_hook)
        self.register_load_state_dict_pre_hook(RelaidLinear._lay_out_hook)

    def _lay_out(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _plain(self) -> Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._layout_name).dtype

    @property
    def weight(self) -> Tensor:
        """The plain ``[out, in]`` weight (a copy: prefer calling the module)."""
        return self._plain()

    @staticmethod
    def _plain_hook(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "weight"] = module._plain()

    @staticmethod
    def _lay_out_hook(module, state_dict, prefix, *args):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict.pop(key).to(module.dtype).contiguous()
            setattr(module, module._layout_name, module._lay_out(w))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.dtype}, layout={self._layout_name}"


class PackedLinear(RelaidLinear):
    """An ``nn.Linear`` (bf16/fp16, CPU) whose weight is kept in oneDNN's prepacked layout (inference only).

    The packed weight is a non-persistent buffer ``packed_weight``; ``state_dict()`` gives it back unpacked
    as ``weight`` (and ``load_state_dict`` repacks a ``weight``), so checkpoints keep the ``nn.Linear`` form.
    """

    _layout_name = "packed_weight"

    def _lay_out(self, weight: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def _plain(self) -> Tensor:
        return self.packed_weight.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class PanelLinear(RelaidLinear):
    """An ``nn.Linear`` (bf16/fp16, CPU) whose weight is kept in panels of 16 output rows
    (:func:`torchvlm.nn.cpu_kernel.pack_panels`) for the C++ panel kernel (inference only).

    For AVX2 CPUs, where oneDNN has no bf16 GEMM (:func:`can_pack` False) and the kernel builds
    (:func:`torchvlm.nn.cpu_kernel.panel_kernel_available`). Products of fewer than :data:`UPCAST_WHOLE_ROWS`
    rows run in :func:`torchvlm.nn.cpu_kernel.panel_linear`: each 16-weight vector is widened to float32 once
    and multiplied with several broadcast input values, the outer-product form of a GEMM micro-kernel. On 2
    AVX2 cores it ran SmolLM2-135M's and Qwen2-1.5B's layers 1.06-1.26x faster than the row-major kernel
    (:func:`torchvlm.nn.cpu_kernel.lowp_linear`) at one row, 1.2-2x at 2-32 rows, and faster than the float32
    GEMM on upcast copies up to ~512 rows (docs/performance.md). Larger products (vision towers) run that
    float32 GEMM. Each output is a float32 sum rounded once to the layer's dtype: equal to the bf16
    ``F.linear`` within its rounding, not bit-identical. The panels are a non-persistent buffer ``panels``;
    ``state_dict()`` gives the plain ``weight`` back. With autograd recording (or after ``model.to(float32)``,
    which converts the panels, whose layout is the same for every dtype) it multiplies as ``F.linear`` on the
    plain weight in float32 (no gradient reaches the panels).
    """

    _layout_name = "panels"

    def _lay_out(self, weight: Tensor) -> Tensor:
        return pack_panels(weight)

    def _plain(self) -> Tensor:
        return unpack_panels(self.panels, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        panels, bias = self.panels, self.bias  # (each module attribute read costs ~1 us in an eager step)
        if (x.numel() < UPCAST_WHOLE_ROWS * self.in_features and x.dtype == panels.dtype
                and panels.dtype in _PACK_DTYPES and not records_grad(x, panels, bias)):
            return panel_linear(x, panels, bias, self.out_features)
        w = unpack_panels(panels, self.out_features, torch.float32)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


class PanelEmbedding(PanelLinear):
    """The token embeddings of a tied LM head (an ``nn.Embedding`` whose weight is also the head's) kept as
    panels (inference only), so that the head's product runs in the panel kernel as :class:`PanelLinear`'s
    do, without a second copy of the table.

    Calling it looks tokens up as ``nn.Embedding`` does: each id's row is gathered from the panels (the same
    values). :meth:`head` is the tied head's product ``hidden @ weight^T``. ``weight`` unpacks a copy of the
    table, so read ``dtype`` / ``device`` (or :func:`stored_weight`) where only those matter; ``state_dict()``
    gives the plain ``weight`` back. On 2 AVX2 cores, 8 rows through SmolLM2-135M's 576 x 49152 head took
    3.7 -> 2.9 ms, through Qwen2-VL-2B's 1536 x 151936 one 54 -> 29 ms; one row about the same as the row-major
    kernel (docs/performance.md, benchmarks/bench_cpu_kernel.py).
    """

    def __init__(self, embedding: nn.Embedding):
        head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        head.weight = embedding.weight
        super().__init__(head)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @property
    def device(self) -> torch.device:
        return self.panels.device

    def forward(self, input_ids: Tensor) -> Tensor:
        """The embeddings ``[..., embedding_dim]`` of ``input_ids``."""
        return panel_rows(self.panels, input_ids)

    def head(self, hidden: Tensor) -> Tensor:
        """The tied head's logits ``hidden @ weight^T`` (:class:`PanelLinear`'s product)."""
        return PanelLinear.forward(self, hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, layout=panels"


def stored_weight(module: nn.Module) -> Tensor:
    """The tensor that holds a layer's weight: ``weight`` of a plain layer, the re-laid-out buffer of a
    :class:`PackedLinear` / :class:`PanelLinear` / :class:`PanelEmbedding` (whose ``weight`` is an unpacked
    copy). For its dtype, device or storage."""
    return getattr(module, module._layout_name) if isinstance(module, RelaidLinear) else module.weight


class UpcastLinear(nn.Linear):
    """An ``nn.Linear`` (bf16/fp16, CPU) that multiplies in float32: prefill-sized products as a float32 GEMM,
    decode-sized ones in a C++ kernel that widens the weight in registers.

    For CPUs where :func:`can_pack` is False (no AVX512-BF16 / AMX: oneDNN has no bf16 GEMM there), PyTorch
    multiplies bf16 matrices with a generic kernel at about 20 GFLOP/s on 2 AVX2 cores, however many rows.
    Products of at least :data:`UPCAST_MIN_ROWS` rows (prompt prefill, vision towers) run as the float32 MKL
    GEMM on upcast copies of both operands (the weight a block of :data:`UPCAST_BLOCK` at a time below
    :data:`UPCAST_WHOLE_ROWS` rows), 5-8x faster; fewer rows (decode steps, continuous batching, short
    prompts) run in :func:`torchvlm.nn.cpu_kernel.lowp_linear`, which reads the bf16 weight once for all rows
    (1.3-1.5x at one row, 3-4.8x at 4-8 rows on 2 AVX2 cores; ``F.linear`` where it cannot be built, or
    while autograd records). Each output is accumulated in float32 and rounded to the layer's dtype once,
    as the bf16 kernel does, only in another order: not bit-identical to ``F.linear`` in bf16, equal within
    its rounding. Same parameters and ``state_dict`` as ``nn.Linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "UpcastLinear":
        """The same layer (sharing its parameters) with the upcasting forward."""
        up = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        up.weight, up.bias = linear.weight, linear.bias
        return up

    def forward(self, x: Tensor) -> Tensor:
        return upcast_linear(x, self.weight, self.bias)


def upcast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:class:`UpcastLinear`'s product as a function (also a tied LM head's on such CPUs, see :func:`pack_linears`)."""
    rows = x.numel() // max(1, x.shape[-1])
    if x.dtype not in _PACK_DTYPES or rows < UPCAST_MIN_ROWS:
        return lowp_linear(x, weight, bias)
    xf = x.float()
    n, k = weight.shape
    block = max(1, UPCAST_BLOCK // k)
    if rows >= UPCAST_WHOLE_ROWS or block >= n or records_grad(x, weight, bias):
        return F.linear(xf, weight.float(), None if bias is None else bias.float()).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], n)
    xf, flat = xf.reshape(rows, k), out.view(rows, n)
    for n0 in range(0, n, block):  # the weight upcast a block at a time (UPCAST_BLOCK)
        flat[:, n0:n0 + block] = F.linear(xf, weight[n0:n0 + block].float(),
                                          None if bias is None else bias[n0:n0 + block].float())
    return out


def pack_linears(model: nn.Module, *, include=None) -> nn.Module:
    """Give the bf16/fp16 CPU ``nn.Linear`` layers of ``model`` the fastest layout this CPU has (in place).

    Where :func:`can_pack` is True they become :class:`PackedLinear` (oneDNN-prepacked, bit-identical);
    elsewhere :class:`PanelLinear` (float32 products in the C++ panel kernel), or :class:`UpcastLinear` where
    that kernel cannot be built (float32 GEMMs for prefill-sized inputs). ``include(name, linear) ->
    bool`` picks layers by dotted name (default: every such layer, the vision tower's too: Qwen2-VL-2B's
    1024-patch image encode took 2.83 -> 2.53 s with its linears packed). float32 layers are left alone:
    oneDNN's packed float32 product rounds differently from ``F.linear`` (MKL) and was not faster for one
    row (docs/performance.md). Without ``include``, a tied LM head (no ``nn.Linear``: the embedding matrix)
    becomes a :class:`PanelEmbedding` where the layers become :class:`PanelLinear` (else it gets
    :func:`upcast_linear` as its product where oneDNN has no bf16 GEMM).
    """
    from ..text.decoder import CausalLM

    every_layer = include is None
    if include is None:
        include = lambda name, lin: True  # noqa: E731
    packs: dict[torch.dtype, bool] = {}

    def packable(dtype: torch.dtype) -> bool:
        """can_pack, asked once per dtype; where it is False the decode kernels are built now (load time)."""
        if dtype not in packs:
            packs[dtype] = can_pack(dtype)
            if not packs[dtype]:
                kernel_available(dtype)
        return packs[dtype]

    def relaid(linear: nn.Linear) -> nn.Module:
        if packable(linear.weight.dtype):
            return PackedLinear(linear)
        return PanelLinear(linear) if panel_kernel_available() else UpcastLinear.from_linear(linear)

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = prefix + child_name
            if type(child) is nn.Linear:
                w = child.weight
                if w.is_cpu and w.dtype in _PACK_DTYPES and include(name, child):
                    setattr(parent, child_name, relaid(child))
            else:
                visit(child, name + ".")

    visit(model, "")
    # a tied LM head (CausalLM.lm_head None: logits = hidden @ embeddings^T) is no nn.Linear (and no layer an
    # ``include`` can name); with every layer converted, on CPUs without oneDNN bf16 the embeddings become
    # panels too (PanelEmbedding), or the head takes UpcastLinear's path (8 rows through SmolLM2's 576 x 49152
    # head: ~3.7 ms in the row-major kernel, ~2.9 ms in panels; several times that in bf16 F.linear)
    for module in list(model.modules()) if every_layer else ():
        emb = module.model.embed_tokens if isinstance(module, CausalLM) and module.lm_head is None else None
        if type(emb) is nn.Embedding and emb.weight.is_cpu and emb.weight.dtype in _PACK_DTYPES \
                and not packable(emb.weight.dtype):
            if panel_kernel_available():
                module.model.embed_tokens = PanelEmbedding(emb)
            else:
                module.tied_head_linear = upcast_linear
    return model


def optimize_for_inference(model: nn.Module, *, fuse: bool = True, pack: bool = True) -> nn.Module:
    """:func:`fuse_projections` then :func:`pack_linears` (in place; returns ``model``). Apply it after
    loading (and after quantizing: quantized layers are neither fused nor packed; to fuse quantized layers,
    fuse before quantizing, as ``VLM.from_pretrained(quantize=...)`` does)."""
    if fuse:
        fuse_projections(model)
    if pack:
        pack_linears(model)
    build_decode_kernels(model)
    return model


def build_decode_kernels(model: nn.Module) -> None:
    """Build the one-query attention, RMSNorm, rope and argmax kernels now (load time, ~15 s once, then
    cached on disk) if ``model`` decodes in bf16/fp16 on the CPU, rather than in its first decode step, or
    never in a compiled one (a compiled graph traced before the build calls the PyTorch fallback)."""
    p = next(model.parameters(), None)
    if p is not None and p.is_cpu and p.dtype in _PACK_DTYPES:
        decode_kernels_available()

