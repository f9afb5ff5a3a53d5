"""Vision-language-action (VLA) heads: a VLM that outputs robot actions (docs/vla.md).

Two ways to read actions out of a VLM:

* **actions as tokens** (RT-2 / OpenVLA): every action dimension is discretised into ``bins`` (256) uniform bins
  over ``[low, high]``, bin ``i`` is the token id ``first_id + i`` (by default the last ``bins`` ids of the
  vocabulary, the least used ones of a BPE vocabulary; or new ids appended to a small vocabulary); the LM is
  trained with cross-entropy on those tokens after the prompt and decodes them greedily
  (:class:`ActionTokenizer`, :class:`TokenActionHead`).
* **a continuous head**: an MLP over the pooled (last-token or mean) decoder hidden state predicts an action
  chunk ``[chunk, action_dim]`` with an L1 or MSE loss (:class:`ContinuousActionHead`).

:class:`VLA` joins a VLM and a head; ``VLA(...)(input_ids, attention_mask, pixel_values, actions=...)``
returns a loss, so it trains with :meth:`torchvlm.train.Trainer.for_model` like any fine-tuning run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ProcessorError
from ..models.base import POOLINGS, VLM, pool_hidden
from .common import add_special_tokens, load_module_state, save_module

__all__ = ["ActionTokenizer", "ContinuousActionHead", "TokenActionHead", "VLA", "VLAOutput"]


class ActionTokenizer:
    """Continuous actions <-> token ids, ``bins`` uniform bins per dimension over ``[low, high]``.

    ``encode`` clips to ``[low, high]`` and gives the bin's token id ``first_id + bin``; ``decode`` gives the
    bin centre, so ``|decode(encode(a)) - a| <= bin_width / 2`` for ``a`` inside the range. ``low`` / ``high``
    are floats or per-dimension sequences.
    """

    def __init__(self, first_id: int, bins: int = 256, low: float | list[float] = -1.0,
                 high: float | list[float] = 1.0):
        if bins < 2:
            raise ConfigError(f"ActionTokenizer: bins must be >= 2, got {bins}")
        self.first_id, self.bins = int(first_id), int(bins)
        self.low = torch.as_tensor(low, dtype=torch.float32)
        self.high = torch.as_tensor(high, dtype=torch.float32)
        if bool((self.high <= self.low).any()):
            raise ConfigError(f"ActionTokenizer: high must exceed low (got low={low}, high={high})")

    @classmethod
    def for_model(cls, model: VLM, tokenizer=None, *, bins: int = 256, low=-1.0, high=1.0,
                  add_tokens: bool | None = None) -> "ActionTokenizer":
        """The OpenVLA layout for ``model``: the last ``bins`` ids of its vocabulary. A vocabulary smaller than
        ``4 * bins`` (or ``add_tokens=True``) gets ``bins`` new tokens ``<act_0>``... instead (added to
        ``tokenizer`` when given, and to the embeddings), so no real token is overwritten."""
        rows = model.language_model.model.embed_tokens.num_embeddings
        if add_tokens is None:
            add_tokens = rows < 4 * bins
        if not add_tokens:
            return cls(rows - bins, bins, low, high)
        if tokenizer is not None:
            ids = add_special_tokens(model, tokenizer, [f"<act_{i}>" for i in range(bins)])
            if ids != list(range(ids[0], ids[0] + bins)):
                raise ConfigError("ActionTokenizer.for_model: the added action tokens are not contiguous ids")
            return cls(ids[0], bins, low, high)
        from .common import resize_token_embeddings

        resize_token_embeddings(model, rows + bins)
        return cls(rows, bins, low, high)

    @property
    def bin_width(self) -> Tensor:
        """Width of a bin (per dimension when ``low`` / ``high`` are)."""
        return (self.high - self.low) / self.bins

    @property
    def last_id(self) -> int:
        """Token id of the last bin."""
        return self.first_id + self.bins - 1

    def to_bins(self, actions: Tensor) -> Tensor:
        """``actions [..., A]`` -> bin indices (long), values clipped to ``[low, high]``."""
        low, high = self.low.to(actions.device), self.high.to(actions.device)
        x = (actions.float() - low) / (high - low) * self.bins
        return x.floor().clamp(0, self.bins - 1).long()

    def from_bins(self, bins: Tensor) -> Tensor:
        """Bin indices -> bin centres (float32)."""
        low, high = self.low.to(bins.device), self.high.to(bins.device)
        return low + (bins.float() + 0.5) * (high - low) / self.bins

    def encode(self, actions: Tensor) -> Tensor:
        """``actions [..., A]`` -> token ids ``[..., A]``."""
        return self.to_bins(actions) + self.first_id

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids ``[..., A]`` -> actions (bin centres). Ids outside the action range are an error."""
        ids = torch.as_tensor(ids)
        if bool(((ids < self.first_id) | (ids > self.last_id)).any()):
            raise ProcessorError(f"ActionTokenizer.decode: ids outside the action range [{self.first_id}, {self.last_id}]")
        return self.from_bins(ids - self.first_id)

    def config(self) -> dict:
        """JSON-able settings (for :meth:`from_config`)."""
        return {"first_id": self.first_id, "bins": self.bins, "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_config(cls, d: dict) -> "ActionTokenizer":
        return cls(d["first_id"], d["bins"], d["low"], d["high"])


@dataclass
class VLAOutput:
    """``loss`` (when actions were given) and the predicted ``actions [B, chunk, action_dim]`` (continuous
    head; the token head predicts with :meth:`VLA.predict`)."""

    loss: Tensor | None = None
    actions: Tensor | None = None


def _actions_3d(actions: Tensor, chunk: int, dim: int) -> Tensor:
    a = actions[:, None] if actions.dim() == 2 else actions
    if a.dim() != 3 or tuple(a.shape[1:]) != (chunk, dim):
        raise ProcessorError(f"actions must be [B, {dim}] or [B, {chunk}, {dim}] for this head, got {tuple(actions.shape)}")
    return a


class ContinuousActionHead(nn.Module):
    """MLP from pooled decoder features to an action chunk ``[B, chunk, action_dim]``.

    Args:
        hidden_size: the language model's hidden size.
        action_dim: action dimensions.
        chunk: actions predicted per call (action chunking, ACT style); 1 = one action.
        pooling: how the prompt's hidden states are pooled (:func:`torchvlm.models.base.pool_hidden`:
            ``last`` (default) or ``mean``, ``first``).
        width, depth: MLP hidden width and number of hidden layers.
        loss: ``"l1"`` or ``"mse"``.
        layer: decoder layer whose hidden states are pooled (HF ``hidden_states`` index; -1 = final output).
    """

    def __init__(self, hidden_size: int, action_dim: int, *, chunk: int = 1, pooling: str = "last",
                 width: int = 256, depth: int = 2, loss: str = "l1", layer: int = -1):
        super().__init__()
        if pooling not in POOLINGS or pooling == "none":
            raise ConfigError(f"ContinuousActionHead: pooling must be mean, last or first, got '{pooling}'")
        if loss not in ("l1", "mse"):
            raise ConfigError(f"ContinuousActionHead: loss must be l1 or mse, got '{loss}'")
        self.settings = dict(hidden_size=hidden_size, action_dim=action_dim, chunk=chunk, pooling=pooling,
                             width=width, depth=depth, loss=loss, layer=layer)
        self.action_dim, self.chunk, self.pooling, self.loss_kind, self.layer = action_dim, chunk, pooling, loss, layer
        layers: list[nn.Module] = [nn.LayerNorm(hidden_size)]
        d = hidden_size
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        layers.append(nn.Linear(d, chunk * action_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """Pooled features ``[B, D]`` -> actions ``[B, chunk, action_dim]``."""
        return self.mlp(features.float()).reshape(features.shape[0], self.chunk, self.action_dim)

    def features(self, vlm: VLM, inputs: dict) -> Tensor:
        """Pooled hidden states ``[B, D]`` of a batch of prompts (with their images)."""
        hidden = vlm.hidden_states(layer=self.layer, **inputs)
        return pool_hidden(hidden, inputs.get("attention_mask"), self.pooling)

    def predict(self, vlm: VLM, inputs: dict) -> Tensor:
        return self(self.features(vlm, inputs))

    def compute_loss(self, vlm: VLM, inputs: dict, actions: Tensor) -> VLAOutput:
        pred = self.predict(vlm, inputs)
        target = _actions_3d(actions, self.chunk, self.action_dim).to(pred)
        loss = F.l1_loss(pred, target) if self.loss_kind == "l1" else F.mse_loss(pred, target)
        return VLAOutput(loss=loss, actions=pred)


class TokenActionHead(nn.Module):
    """Actions as LM tokens (OpenVLA): ``chunk * action_dim`` action tokens follow the prompt; training is
    cross-entropy over the action bins at those positions, prediction greedy decoding restricted to them.
    No parameters of its own: the LM (its embeddings / head rows of the action ids) learns the bins."""

    def __init__(self, tokenizer: ActionTokenizer, action_dim: int, *, chunk: int = 1):
        super().__init__()
        self.tokenizer, self.action_dim, self.chunk = tokenizer, action_dim, chunk
        self.settings = dict(tokenizer=tokenizer.config(), action_dim=action_dim, chunk=chunk)

    @staticmethod
    def _left_aligned(input_ids: Tensor, attention_mask: Tensor | None, pad: int) -> tuple[Tensor, Tensor]:
        """Rows moved to left padding (so tokens can be appended at the end)."""
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        mask = attention_mask.bool()
        ids, new_mask = torch.full_like(input_ids, pad), torch.zeros_like(attention_mask)
        t = input_ids.shape[1]
        for i in range(input_ids.shape[0]):
            real = input_ids[i][mask[i]]
            ids[i, t - real.numel():] = real
            new_mask[i, t - real.numel():] = 1
        return ids, new_mask

    def _logits(self, vlm: VLM, inputs: dict, ids: Tensor, mask: Tensor, n: int) -> Tensor:
        """Action-bin logits ``[B, n, bins]`` predicting the last ``n`` positions' next tokens."""
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = vlm.hidden_states(ids, mask, **extra)[:, -n:]
        lm = vlm.language_model
        w = lm.model.embed_tokens.weight if lm.lm_head is None else lm.lm_head.weight
        logits = F.linear(hidden, w[self.tokenizer.first_id:self.tokenizer.last_id + 1])  # the action rows only
        cap = getattr(vlm.text_config, "final_logit_softcap", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits.float()

    def compute_loss(self, vlm: VLM, inputs: dict, actions: Tensor) -> VLAOutput:
        target = self.tokenizer.to_bins(_actions_3d(actions, self.chunk, self.action_dim)).reshape(actions.shape[0], -1)
        pad = vlm.text_config.pad_token_id or 0
        ids, mask = self._left_aligned(inputs["input_ids"], inputs.get("attention_mask"), pad)
        n = target.shape[1]
        ids = torch.cat([ids, target.to(ids.device) + self.tokenizer.first_id], 1)
        mask = torch.cat([mask, torch.ones_like(target, dtype=mask.dtype, device=mask.device)], 1)
        # position j of the appended block predicts action token j from the tokens before it
        logits = self._logits(vlm, inputs, ids[:, :-1], mask[:, :-1], n)
        loss = F.cross_entropy(logits.reshape(-1, self.tokenizer.bins), target.reshape(-1).to(logits.device))
        return VLAOutput(loss=loss)

    @torch.no_grad()
    def predict(self, vlm: VLM, inputs: dict) -> Tensor:
        pad = vlm.text_config.pad_token_id or 0
        ids, mask = self._left_aligned(inputs["input_ids"], inputs.get("attention_mask"), pad)
        bins = []
        for _ in range(self.chunk * self.action_dim):
            b = self._logits(vlm, inputs, ids, mask, 1)[:, -1].argmax(-1)
            bins.append(b)
            ids = torch.cat([ids, (b + self.tokenizer.first_id)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = self.tokenizer.from_bins(torch.stack(bins, 1))
        return out.reshape(out.shape[0], self.chunk, self.action_dim)


class VLA(nn.Module):
    """A vision-language-action model: ``vlm`` + an action ``head`` (:class:`ContinuousActionHead` or
    :class:`TokenActionHead`).

    ``forward(input_ids, attention_mask, pixel_values, actions=..., **image_extras)`` returns a
    :class:`VLAOutput` with the loss; :meth:`predict` returns actions ``[B, chunk, action_dim]``. Train it with
    ``torchvlm.train.Trainer.for_model(cfg, vla, data, collate_fn=..., parts=vla.parameter_parts(),
    save_fn=vla.save_pretrained)``.
    """

    def __init__(self, vlm: VLM, head: nn.Module):
        super().__init__()
        self.vlm, self.head = vlm, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                actions: Tensor | None = None, **extra) -> VLAOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}
        if actions is None:
            return VLAOutput(actions=self.head.predict(self.vlm, inputs))
        return self.head.compute_loss(self.vlm, inputs, actions)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                **extra) -> Tensor:
        """Actions ``[B, chunk, action_dim]`` for a batch of prompts with their images."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}
        return self.head.predict(self.vlm, inputs)

    def parameter_parts(self) -> dict[str, str]:
        """Optimizer groups for :meth:`torchvlm.train.Trainer.for_model`: the VLM's vision / connector /
        language parts and ``head``."""
        from ..train.finetune import parameter_parts

        parts = {f"vlm.{n}": p for n, p in parameter_parts(self.vlm).items()}
        parts.update({f"head.{n}": "head" for n, _ in self.head.named_parameters()})
        return parts

    def save_pretrained(self, folder: str | os.PathLike, processor=None) -> None:
        """The VLM (HF layout, plus ``processor`` files when given) and ``action_head.safetensors/.json``."""
        self.vlm.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        kind = "tokens" if isinstance(self.head, TokenActionHead) else "continuous"
        save_module(self.head, folder, "action_head", {"kind": kind, **self.head.settings})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **load_kwargs) -> "VLA":
        """Load what :meth:`save_pretrained` wrote (``load_kwargs`` go to :meth:`VLM.from_pretrained`)."""
        config, state = load_module_state(folder, "action_head")
        vlm = VLM.from_pretrained(folder, **load_kwargs)
        kind = config.pop("kind")
        if kind == "tokens":
            head = TokenActionHead(ActionTokenizer.from_config(config["tokenizer"]), config["action_dim"],
                                   chunk=config["chunk"])
        else:
            head = ContinuousActionHead(**config)
            head.load_state_dict(state)
            head.to(vlm.device)
        return cls(vlm, head).eval()
