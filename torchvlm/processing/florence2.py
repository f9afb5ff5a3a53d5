"""Florence-2 processor: task prompts, image preprocessing, and the post-processing of location tokens.

Matches HF transformers' ``Florence2Processor`` (``florence-community/Florence-2-*`` checkpoints):

* **Prompts.** A prompt is a task token (``"<OD>"``, ``"<CAPTION>"``, ...), optionally followed by the task's
  text input (``"<CAPTION_TO_PHRASE_GROUNDING>A green car"``); it is replaced by the natural-language prompt
  the model was trained on (:data:`TASK_PROMPTS_WITHOUT_INPUT`, :data:`TASK_PROMPTS_WITH_INPUT`). Any other
  text is passed through unchanged. With an image, each prompt becomes
  ``<image> * num_image_tokens + <s> + prompt + </s>`` (one image per prompt); without images the prompt is
  tokenized bare. The tokenizer adds no special tokens of its own (HF's ``add_special_tokens=False``).
* **Images.** The checkpoint's ``CLIPImageProcessor`` config (resize to ``size`` with no crop, rescale,
  normalize), through the shared :mod:`torchvlm.processing.image_processors`.
* **Outputs.** Generated text holds location tokens ``<loc_0>`` .. ``<loc_999>`` (1000 bins per axis).
  :meth:`Florence2Processor.post_process_generation` turns them into boxes / quadrilaterals / polygons in
  image pixels exactly as HF does (bin centre, truncated to int), keyed by task.

Tasks (see :data:`TASKS`) are exposed through the generic task hook that :func:`torchvlm.generate` and
``torchvlm generate --task`` use: :attr:`Florence2Processor.tasks`, :meth:`Florence2Processor.task_prompt`,
:meth:`Florence2Processor.decode_generation` and :meth:`Florence2Processor.post_process_task`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from torchvlm.errors import ConfigError, ProcessorError
from torchvlm.processing.processor import Processor
from torchvlm.processing.tokenizer import Tokenizer

__all__ = [
    "Florence2Processor",
    "Florence2PostProcessor",
    "TASKS",
    "TaskSpec",
    "TASK_PROMPTS_WITHOUT_INPUT",
    "TASK_PROMPTS_WITH_INPUT",
    "TASK_POST_PROCESSING",
    "DEFAULT_POST_PROCESSOR_CONFIG",
    "florence2_num_image_tokens",
]

IMAGE_TOKEN = "<image>"

#: task token -> prompt, for tasks that take only the image (HF order: the first match wins)
TASK_PROMPTS_WITHOUT_INPUT: dict[str, str] = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}

#: task token -> prompt template, for tasks that take a text input (``{input}``: a phrase, or a region as
#: four location tokens ``<loc_x1><loc_y1><loc_x2><loc_y2>``)
TASK_PROMPTS_WITH_INPUT: dict[str, str] = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}

#: task token -> post-processing type (HF ``tasks_answer_post_processing_type``; other tasks: ``pure_text``)
TASK_POST_PROCESSING: dict[str, str] = {
    "<OCR>": "pure_text",
    "<OCR_WITH_REGION>": "ocr",
    "<CAPTION>": "pure_text",
    "<DETAILED_CAPTION>": "pure_text",
    "<MORE_DETAILED_CAPTION>": "pure_text",
    "<OD>": "description_with_bboxes",
    "<DENSE_REGION_CAPTION>": "description_with_bboxes",
    "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
    "<REGION_TO_SEGMENTATION>": "polygons",
    "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
    "<REGION_TO_CATEGORY>": "pure_text",
    "<REGION_TO_DESCRIPTION>": "pure_text",
    "<REGION_TO_OCR>": "pure_text",
    "<REGION_PROPOSAL>": "bboxes",
}

_OUTPUTS = {
    "pure_text": "text",
    "ocr": "{quad_boxes, labels}",
    "description_with_bboxes": "{bboxes, labels}",
    "bboxes": "{bboxes, labels}",
    "phrase_grounding": "{bboxes, labels}",
    "polygons": "{polygons, labels}",
    "description_with_polygons": "{polygons, labels}",
    "description_with_bboxes_or_polygons": "{bboxes, bboxes_labels, polygons, polygons_labels}",
}


@dataclass(frozen=True)
class TaskSpec:
    """One Florence-2 task: its token, whether it takes a text input, its prompt and post-processing type."""

    token: str
    takes_input: bool
    prompt: str
    post_processing: str

    @property
    def name(self) -> str:
        """The task name without angle brackets (``"OD"``)."""
        return self.token[1:-1]

    @property
    def output(self) -> str:
        """What :meth:`Florence2Processor.post_process_task` returns for this task."""
        return _OUTPUTS[self.post_processing]


#: task name (without brackets) -> :class:`TaskSpec`, in HF's order
TASKS: dict[str, TaskSpec] = {
    **{t[1:-1]: TaskSpec(t, False, p, TASK_POST_PROCESSING.get(t, "pure_text"))
       for t, p in TASK_PROMPTS_WITHOUT_INPUT.items()},
    **{t[1:-1]: TaskSpec(t, True, p, TASK_POST_PROCESSING.get(t, "pure_text"))
       for t, p in TASK_PROMPTS_WITH_INPUT.items()},
}

#: the ``post_processor_config`` of the converted hub checkpoints (used when a checkpoint has none)
DEFAULT_POST_PROCESSOR_CONFIG: dict[str, dict] = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {
        "banned_grounding_tokens": [
            "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they",
            "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself",
            "himself", "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these",
            "those", "who", "whom", "whose", "which", "what", "all", "another", "any", "anybody", "anyone",
            "anything", "each", "everybody", "everyone", "everything", "few", "many", "nobody", "none",
            "several", "some", "somebody", "someone", "something", "each other", "one another", "the image",
            "image", "images", "the", "a", "an", "a group", "other objects", "lots", "a set",
        ],
    },
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

#: HF DaViT defaults (``Florence2VisionConfig``) for fields a config.json may leave out
_DAVIT_DEFAULTS = {"patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1]}


def florence2_num_image_tokens(config: dict, height: int, width: int) -> int:
    """Image tokens per image for a ``height`` x ``width`` input; the one count the processor and model share.

    The DaViT tower downsamples with one strided convolution per stage (``vision_config.patch_size`` /
    ``patch_stride`` / ``patch_padding``); the projector emits one pooled token plus one token per cell of
    the final grid: ``1 + H' * W'`` (577 for 768 x 768 with the default stages).
    """
    vc = config.get("vision_config") or {}
    if not isinstance(vc, dict):
        raise ConfigError("config.json: field 'vision_config' must be an object")
    fields = {k: vc.get(k, d) for k, d in _DAVIT_DEFAULTS.items()}
    n = {len(v) if isinstance(v, (list, tuple)) else -1 for v in fields.values()}
    if len(n) != 1 or -1 in n:
        raise ConfigError("config.json: vision_config patch_size / patch_stride / patch_padding must be lists of "
                          f"one length (got {fields})")
    h, w = height, width
    for k, s, p in zip(fields["patch_size"], fields["patch_stride"], fields["patch_padding"]):
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if h <= 0 or w <= 0:
        raise ConfigError(f"image size {height}x{width} is too small for the DaViT stages of config.json")
    return 1 + h * w


def _dequantize(bins: list, size: tuple[int, int], bins_wh: tuple[int, int] = (1000, 1000)) -> torch.Tensor:
    """HF ``Florence2PostProcessor.dequantize``: bin centre ``(b + 0.5) * size / bins`` in float32, ``.int()``.

    *bins* is an ``[N, 4]`` (boxes) or ``[N, 2]`` (points) nested list of ints; *size* is ``(width, height)``.
    """
    locations = torch.tensor(bins)
    bins_w, bins_h = bins_wh
    size_w, size_h = size
    per_bin_w, per_bin_h = size_w / bins_w, size_h / bins_h
    if locations.shape[-1] == 4:
        xmin, ymin, xmax, ymax = locations.split(1, dim=-1)
        return torch.cat([(xmin + 0.5) * per_bin_w, (ymin + 0.5) * per_bin_h,
                          (xmax + 0.5) * per_bin_w, (ymax + 0.5) * per_bin_h], dim=-1).int()
    if locations.shape[-1] == 2:
        x, y = locations.split(1, dim=-1)
        return torch.cat([(x + 0.5) * per_bin_w, (y + 0.5) * per_bin_h], dim=-1).int()
    raise ProcessorError(f"location tensor must end in 2 or 4 values, got {locations.shape[-1]}")


def _quantize(locations: torch.Tensor, size: tuple[int, int], bins_wh: tuple[int, int] = (1000, 1000)) -> torch.Tensor:
    """HF ``Florence2PostProcessor.quantize``: pixel coordinates -> bins ``floor(x / (size / bins))``, clamped."""
    bins_w, bins_h = bins_wh
    size_w, size_h = size
    per_bin_w, per_bin_h = size_w / bins_w, size_h / bins_h
    parts = locations.split(1, dim=-1)
    if len(parts) not in (2, 4):
        raise ProcessorError(f"coordinates must be a box (x1, y1, x2, y2) or points (x, y), got {len(parts)} values")
    out = []
    for i, v in enumerate(parts):
        per_bin, top = (per_bin_w, bins_w - 1) if i % 2 == 0 else (per_bin_h, bins_h - 1)
        out.append((v / per_bin).floor().clamp(0, top))
    return torch.cat(out, dim=-1).int()


_TEXT_PATTERN = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"
_BOX_PATTERN = r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
_DEFAULT_OCR_PATTERN = r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"


def _strip(text: str) -> str:
    return text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


class Florence2PostProcessor:
    """Parses generated Florence-2 text into structured results; a line-for-line port of HF's
    ``Florence2PostProcessor`` (same regular expressions, same float32 dequantization).

    Args:
        config: the ``post_processor_config`` (parse type -> options); the parse types it lists are the
            ones allowed. As in HF, the OCR options are read from the upper-case keys ``PATTERN`` and
            ``AREA_THRESHOLD`` (the hub configs' lower-case ``pattern`` / ``area_threshold`` are not read).
        special_tokens: tokens kept verbatim when decoding a token sequence (HF ``all_special_tokens``).
        tokenizer: used by the ``sequence=`` path only.
    """

    def __init__(self, config: dict, tokenizer: Tokenizer | None = None, special_tokens: Sequence[str] = ()):
        self.parse_task_config = dict(config)
        self.tokenizer = tokenizer
        self.special_tokens = set(special_tokens)
        pg = self.parse_task_config.get("phrase_grounding") or {}
        self.banned_grounding_tokens = set(pg.get("banned_grounding_tokens", []))
        self.quantize_bins = (1000, 1000)

    def dequantize(self, bins: list, size: tuple[int, int]) -> torch.Tensor:
        """Bins -> pixel coordinates (see :func:`_dequantize`)."""
        return _dequantize(bins, size, self.quantize_bins)

    def quantize(self, locations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates -> bins (see :func:`_quantize`)."""
        return _quantize(locations, size, self.quantize_bins)

    def decode_with_spans(self, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """Decode ids token by token (special tokens verbatim); returns the text and each token's span."""
        if self.tokenizer is None:
            raise ProcessorError("decoding a token sequence needs the tokenizer")
        backend = self.tokenizer.backend
        text, spans = "", []
        for i in token_ids:
            token = backend.id_to_token(int(i))
            if token is None:
                raise ProcessorError(f"token id {i} is not in the vocabulary")
            if token in self.special_tokens:
                sub = token
            elif backend.decoder is not None:
                sub = backend.decoder.decode([token])
            else:
                sub = token
            spans.append((len(text), len(text) + len(sub)))
            text += sub
        return text, spans

    def parse_ocr(self, text: str, pattern: str | None, image_size: tuple[int, int],
                  area_threshold: float = 0.0) -> list[dict[str, Any]]:
        """Text + 8 location tokens per line -> ``[{"quad_box": [x1, y1, ..., x4, y4], "text": ...}]``."""
        text = _strip(text)
        matches = re.findall(pattern or _DEFAULT_OCR_PATTERN, text)
        width, height = image_size
        instances = []
        for content, *quad_str in matches:
            quad_box = self.dequantize(torch.tensor([int(i) for i in quad_str]).reshape(-1, 2).tolist(),
                                       image_size).flatten().tolist()
            if area_threshold > 0:
                xs, ys = quad_box[0::2], quad_box[1::2]
                area = 0.5 * abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(4 - 1)))
                if area < (width * height) * area_threshold:
                    continue
            instances.append({"quad_box": quad_box, "text": content.strip()})
        return instances

    def parse_phrase_grounding(self, text: str, image_size: tuple[int, int]) -> list[dict[str, Any]]:
        """Phrases each followed by one or more boxes -> ``[{"bbox": [[x1, y1, x2, y2], ...], "cat_name": ...}]``
        (phrases in ``banned_grounding_tokens`` are dropped)."""
        text = _strip(text)
        instances = []
        for phrase_text in re.findall(r"([^<]+(?:<loc_\d+>){4,})", text):
            phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
            if not phrase_text:
                continue
            match = re.search(_TEXT_PATTERN, phrase_text)
            if not match:
                continue
            phrase = match.group().strip()
            if phrase in self.banned_grounding_tokens:
                continue
            boxes = list(re.finditer(_BOX_PATTERN, phrase_text))
            if not boxes:
                continue
            bboxes = self.dequantize([[int(m.group(j)) for j in range(1, 5)] for m in boxes], image_size).tolist()
            instances.append({"bbox": bboxes, "cat_name": phrase.encode("ascii", "ignore").decode("ascii")})
        return instances

    def parse_description_with_bboxes(self, text: str, image_size: tuple[int, int],
                                      allow_empty_phrase: bool = False) -> list[dict[str, Any]]:
        """Label + box(es) -> one ``{"bbox": [x1, y1, x2, y2], "cat_name": label}`` per box."""
        text = _strip(text)
        pattern = r"(?:(?:<loc_\d+>){4,})" if allow_empty_phrase else r"([^<]+(?:<loc_\d+>){4,})"
        instances = []
        for phrase_text in re.findall(pattern, text):
            phrase_text = phrase_text.replace("<ground>", "", 1).replace("<obj>", "", 1)
            if not phrase_text and not allow_empty_phrase:
                continue
            match = re.search(_TEXT_PATTERN, phrase_text)
            if not match:
                continue
            phrase = match.group().strip()
            boxes = list(re.finditer(_BOX_PATTERN, phrase_text))
            if not boxes:
                continue
            bboxes = self.dequantize([[int(m.group(j)) for j in range(1, 5)] for m in boxes], image_size).tolist()
            phrase = phrase.encode("ascii", "ignore").decode("ascii")
            instances.extend({"bbox": bbox, "cat_name": phrase} for bbox in bboxes)
        return instances

    def parse_description_with_polygons(
        self,
        text: str,
        image_size: tuple[int, int],
        allow_empty_phrase: bool = False,
        polygon_sep_token: str = "<sep>",
        polygon_start_token: str = "<poly>",
        polygon_end_token: str = "</poly>",
        with_box_at_start: bool = False,
    ) -> list[dict[str, Any]]:
        """Label + polygon(s) -> ``[{"cat_name": label, "polygons": [[x1, y1, x2, y2, ...], ...]}]``."""
        text = _strip(text)
        sep, start, end = (re.escape(t) for t in (polygon_sep_token, polygon_start_token, polygon_end_token))
        if allow_empty_phrase:
            pattern = rf"(?:(?:<loc_\d+>|{sep}|{start}|{end}){{4,}})"
        else:
            pattern = rf"([^<]+(?:<loc_\d+>|{sep}|{start}|{end}){{4,}})"
        phrase_pattern = r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)"
        poly_instance_pattern = rf"{start}(.*?){end}"
        box_pattern = rf"((?:<loc_\d+>)+)(?:{sep}|$)"

        instances = []
        for phrase_text in re.findall(pattern, text):
            phrase_text_strip = re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
            if not phrase_text_strip and not allow_empty_phrase:
                continue
            match = re.search(phrase_pattern, phrase_text_strip)
            if not match:
                continue
            phrase = match.group().strip()
            if polygon_start_token in phrase_text and polygon_end_token in phrase_text:
                poly_instances = [m.group(1) for m in re.finditer(poly_instance_pattern, phrase_text)]
            else:
                poly_instances = [phrase_text]
            for poly_inst in poly_instances:
                poly_matches = list(re.finditer(box_pattern, poly_inst))
                if not poly_matches:
                    continue
                bbox: list[int] = []
                polygons = []
                for poly_match in poly_matches:
                    poly_bins = [int(m.group(1)) for m in re.finditer(r"<loc_(\d+)>", poly_match.group(1))]
                    if with_box_at_start and not bbox:
                        if len(poly_bins) > 4:
                            bbox, poly_bins = poly_bins[:4], poly_bins[4:]
                        else:
                            bbox = [0, 0, 0, 0]
                    if len(poly_bins) % 2 == 1:
                        poly_bins = poly_bins[:-1]
                    # HF dequantizes an empty [0, 2] tensor here, which gives an empty polygon
                    polygons.append(self.dequantize(torch.tensor(poly_bins).reshape(-1, 2).tolist(),
                                                    image_size).flatten().tolist() if poly_bins else [])
                instance: dict[str, Any] = {"cat_name": phrase, "polygons": polygons}
                if bbox:
                    instance["bbox"] = self.dequantize([bbox], image_size)[0].tolist()
                instances.append(instance)
        return instances

    def __call__(self, text: str | None = None, sequence: Any = None, image_size: tuple[int, int] | None = None,
                 parse_tasks: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Parse *text* (or a token *sequence*) for each of *parse_tasks* (default: every configured type).

        Returns ``{"text": text, <parse type>: result, ...}``."""
        if parse_tasks is not None:
            parse_tasks = [parse_tasks] if isinstance(parse_tasks, str) else list(parse_tasks)
            for task in parse_tasks:
                if task not in self.parse_task_config:
                    raise ProcessorError(
                        f"post_processor_config has no '{task}' entry (configured: "
                        f"{', '.join(self.parse_task_config) or 'none'})"
                    )
        if (text is None) == (sequence is None):
            raise ProcessorError("give exactly one of text= or sequence= to post-process")
        if sequence is not None:
            if hasattr(sequence, "tolist"):
                sequence = sequence.tolist()
            sequence = [int(i) for i in sequence]
            bos = self.tokenizer.bos_token_id if self.tokenizer is not None else None
            if sequence and sequence[0] == bos:
                sequence = sequence[1:]
            text, _ = self.decode_with_spans(sequence)
        if not isinstance(text, str):
            raise ProcessorError(f"text to post-process must be a str, got {type(text).__name__}")

        parsed: dict[str, Any] = {"text": text}
        for task in parse_tasks or list(self.parse_task_config):
            config = self.parse_task_config[task] or {}
            if task == "ocr":
                parsed[task] = self.parse_ocr(text, pattern=config.get("PATTERN"), image_size=image_size,
                                              area_threshold=config.get("AREA_THRESHOLD", 0.0))
            elif task == "phrase_grounding":
                parsed[task] = self.parse_phrase_grounding(text, image_size=image_size)
            elif task == "pure_text":
                parsed[task] = text
            elif task == "description_with_bboxes":
                parsed[task] = self.parse_description_with_bboxes(text, image_size=image_size)
            elif task == "description_with_polygons":
                parsed[task] = self.parse_description_with_polygons(text, image_size=image_size)
            elif task == "polygons":
                parsed[task] = self.parse_description_with_polygons(text, image_size=image_size,
                                                                    allow_empty_phrase=True)
            elif task == "bboxes":
                parsed[task] = self.parse_description_with_bboxes(text, image_size=image_size,
                                                                  allow_empty_phrase=True)
            elif task == "description_with_bboxes_or_polygons":
                if "<poly>" in text:
                    parsed[task] = self.parse_description_with_polygons(text, image_size=image_size)
                else:
                    parsed[task] = self.parse_description_with_bboxes(text, image_size=image_size)
            else:
                raise ProcessorError(f"post_processor_config: unknown parse type '{task}'")
        return parsed


# messages -> the text parts of the user turns (Florence-2 checkpoints ship no chat template; the image is
# placed by the processor, not the template)
FLORENCE2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def _check_image_size(image_size: Any) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ProcessorError(f"image_size must be (width, height) of the original image, got {image_size!r}")
    return image_size[0], image_size[1]


class Florence2Processor(Processor):
    """Florence-2: CLIP-style image processor + BART tokenizer, task prompts and location-token parsing.

    Args:
        tokenizer: the BART byte-level BPE :class:`Tokenizer` with ``<loc_0>`` .. ``<loc_999>`` and
            ``<image>`` among its added tokens.
        image_processor: the image processor (``CLIPImageProcessor`` config: resize to ``size``, no crop).
        num_image_tokens: image tokens per image; default: the image processor config's
            ``image_seq_length`` (what HF uses), else counted from ``config.json`` and the image size.
        post_processor_config: parse options; default: ``post_processor_config`` of
            ``processor_config.json``, else :data:`DEFAULT_POST_PROCESSOR_CONFIG`.
        **kwargs: as for :class:`Processor`.

    Call it with ``text="<OD>"`` (or ``"<CAPTION_TO_PHRASE_GROUNDING>a red car"``) and ``images=image``;
    several prompts take a flat list of as many images (one image per prompt).
    """

    processor_class = "Florence2Processor"
    default_image_processor_type = "CLIPImageProcessor"
    default_chat_template = FLORENCE2_CHAT_TEMPLATE
    image_token = IMAGE_TOKEN
    chat_adds_no_special_tokens = True

    #: task names this processor runs (the generic task hook of :func:`torchvlm.generate`)
    tasks: tuple[str, ...] = tuple(TASKS)

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor=None,
        *,
        num_image_tokens: int | None = None,
        post_processor_config: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(tokenizer, image_processor, **kwargs)
        self.image_token = (tokenizer.extra_special_tokens.get("image_token")
                            or _str_or_none(tokenizer.config.get("image_token")) or IMAGE_TOKEN)
        tid = tokenizer.backend.token_to_id(self.image_token)
        if tid is None:
            raise ConfigError(f"tokenizer: image token '{self.image_token}' is not in the vocabulary")
        self.image_token_id = tid
        if tokenizer.bos_token is None or tokenizer.eos_token is None:
            raise ConfigError("tokenizer_config.json: Florence-2 needs both bos_token and eos_token")
        if tokenizer.backend.token_to_id("<loc_0>") is None:
            raise ConfigError("tokenizer: '<loc_0>' is not in the vocabulary (Florence-2 location tokens "
                              "<loc_0>..<loc_999> must be added tokens of tokenizer.json)")
        if num_image_tokens is None:
            num_image_tokens = self._default_num_image_tokens()
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens <= 0:
            raise ConfigError(f"image_seq_length / num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens
        if post_processor_config is None:
            post_processor_config = self.config.get("post_processor_config")
        if post_processor_config is None:
            post_processor_config = DEFAULT_POST_PROCESSOR_CONFIG
        if not isinstance(post_processor_config, dict):
            raise ConfigError("processor_config.json: field 'post_processor_config' must be an object")
        self.post_processor_config = post_processor_config
        specials = set(tokenizer.special_tokens_map.values()) | set(tokenizer.additional_special_tokens)
        specials.add(self.image_token)
        self.post_processor = Florence2PostProcessor(post_processor_config, tokenizer, specials)

    def _default_num_image_tokens(self) -> int | None:
        ip = self.image_processor
        if ip is None:
            return 1  # text-only use; never consulted without images
        seq = ip.config.get("image_seq_length")
        if seq is not None:
            return seq
        if not self.model_config:
            raise ConfigError("image processor config: field 'image_seq_length' missing (and no config.json to "
                              "count the image tokens from)")
        if not {"height", "width"} <= set(ip.size or {}):
            raise ConfigError("image processor config: field 'image_seq_length' missing and 'size' is not a "
                              "fixed height/width")
        h, w = ip.output_size(ip.size["height"], ip.size["width"])
        return florence2_num_image_tokens(self.model_config, h, w)

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def construct_prompts(texts: Sequence[str]) -> list[str]:
        """Replace task tokens by their prompts, exactly as HF's ``_construct_prompts``.

        A task that takes no input must be the whole prompt (else ProcessorError); for a task with input,
        the rest of the prompt (stripped) is the input. Text without a task token is kept as it is."""
        prompts = []
        for prompt in texts:
            for token, task_prompt in TASK_PROMPTS_WITHOUT_INPUT.items():
                if token in prompt:
                    if prompt != token:
                        raise ProcessorError(
                            f"task token {token} must be the whole prompt (it takes no text input), got {prompt!r}"
                        )
                    prompt = task_prompt
                    break
            for token, task_prompt in TASK_PROMPTS_WITH_INPUT.items():
                if token in prompt:
                    prompt = task_prompt.format(input=prompt.replace(token, "").strip())
                    break
            prompts.append(prompt)
        return prompts

    def prepare_texts(self, texts: list[str], images: list[list[Any]]) -> list[str]:
        """Task tokens -> prompts; with images, ``<image> + <s> + prompt + </s>`` (one image per prompt)."""
        for i, t in enumerate(texts):
            if self.image_token in t:
                raise ProcessorError(f"prompt {i} contains the image placeholder '{self.image_token}'; Florence-2 "
                                     "places the image itself (pass images=)")
        prompts = self.construct_prompts(texts)
        counts = [len(ims) for ims in images]
        if not any(counts):
            return prompts
        if any(c != 1 for c in counts):
            raise ProcessorError(f"Florence-2 takes exactly one image per prompt, got {counts} for "
                                 f"{len(texts)} prompt(s)")
        bos, eos = self.tokenizer.bos_token, self.tokenizer.eos_token
        return [f"{self.image_token}{bos}{p}{eos}" for p in prompts]

    def image_replacement(self, pixel_values: torch.Tensor) -> str:
        return self.image_token * self.num_image_tokens

    def __call__(self, messages: Any = None, *, text: str | Sequence[str] | None = None, images: Any = None,
                 add_special_tokens: bool | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """As :meth:`Processor.__call__`, with Florence-2's rules: the tokenizer adds no special tokens unless
        ``add_special_tokens=True``; ``images`` alone means an empty prompt per image; a flat list of N images
        with N prompts gives one image to each prompt."""
        if messages is None and text is None and images is not None:
            text = [""] * (len(images) if isinstance(images, (list, tuple)) else 1)
        return super().__call__(messages, text=text, images=images,
                                add_special_tokens=bool(add_special_tokens), **kwargs)

    @staticmethod
    def _split_images(images: Any, batch: int) -> list[list[Any]]:
        if (isinstance(images, (list, tuple)) and batch > 1 and len(images) == batch
                and not any(isinstance(x, (list, tuple)) for x in images)):
            return [[im] for im in images]
        return Processor._split_images(images, batch)

    # ------------------------------------------------------------------ tasks (generic hook)
    def task_spec(self, task: str) -> TaskSpec:
        """The :class:`TaskSpec` of a task name (``"OD"``, ``"<OD>"``, ``"od"`` all work).

        Raises ProcessorError naming the valid tasks for an unknown name."""
        if not isinstance(task, str):
            raise ProcessorError(f"task must be a string, got {type(task).__name__}")
        key = task.strip()
        if key.startswith("<") and key.endswith(">"):
            key = key[1:-1]
        spec = TASKS.get(key.upper())
        if spec is None:
            raise ProcessorError(f"unknown task '{task}'; valid tasks: {', '.join(self.tasks)}")
        return spec

    def task_prompt(self, task: str, text: str | None = None) -> str:
        """The prompt string for *task* (its token, plus *text* for tasks that take an input).

        Raises ProcessorError for an unknown task, a missing text input, or a text input given to a task
        that takes none."""
        spec = self.task_spec(task)
        if spec.takes_input:
            if text is None or not isinstance(text, str) or not text.strip():
                raise ProcessorError(f"task '{spec.name}' needs a text input (text=... in Python, --text on the "
                                     "command line), e.g. a phrase or a region as <loc_x1><loc_y1><loc_x2><loc_y2>")
            return spec.token + text
        if text is not None:
            raise ProcessorError(f"task '{spec.name}' takes no text input, got text={text!r}")
        return spec.token

    def decode_generation(self, ids: Any) -> str:
        """Generated ids -> text as HF users decode before post-processing: every token kept
        (``skip_special_tokens=False``, location tokens included), then ``</s>``, ``<s>`` and ``<pad>``
        removed."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for t in ("</s>", "<s>", "<pad>"):
            text = text.replace(t, "")
        return text

    def post_process_generation(self, text: str | None = None, task: str | None = None,
                                image_size: tuple[int, int] | None = None, *, sequence: Any = None) -> dict:
        """HF ``post_process_generation``: ``{task: answer}`` for generated *text* (or a token *sequence*).

        Args:
            text: generated text (``batch_decode(..., skip_special_tokens=False)`` or
                :meth:`decode_generation`).
            task: the task token as given to the processor (``"<OD>"``); tasks not in
                :data:`TASK_POST_PROCESSING` are parsed as plain text, like HF.
            image_size: ``(width, height)`` of the original image (``PIL.Image.size``); location bins are
                mapped to this size.
            sequence: generated ids instead of *text* (decoded token by token, as HF does).

        Returns:
            ``{task: answer}`` where answer is a string (``pure_text``) or a dict:
            ``{"bboxes": [[x1, y1, x2, y2], ...], "labels": [...]}`` (OD, dense region caption, region
            proposal, phrase grounding), ``{"quad_boxes": [[x1, y1, ..., x4, y4], ...], "labels": [...]}``
            (OCR with region), ``{"polygons": [[[x1, y1, ...], ...], ...], "labels": [...]}``
            (segmentation), ``{"bboxes", "bboxes_labels", "polygons", "polygons_labels"}`` (open vocabulary
            detection).
        """
        if task is None:
            raise ProcessorError("post_process_generation: task= is required (e.g. '<OD>')")
        kind = TASK_POST_PROCESSING.get(task, "pure_text")
        if kind != "pure_text" and image_size is None:
            raise ProcessorError(f"post_process_generation: task {task} needs image_size=(width, height)")
        if image_size is not None:
            image_size = _check_image_size(image_size)
        parsed = self.post_processor(text=text, sequence=sequence, image_size=image_size, parse_tasks=[kind])[kind]
        if kind == "pure_text":
            answer: Any = parsed.replace("<s>", "").replace("</s>", "").strip()
        elif kind in ("description_with_bboxes", "bboxes"):
            answer = {"bboxes": [i["bbox"] for i in parsed], "labels": [i["cat_name"] for i in parsed]}
            if parsed and "score" in parsed[0]:
                answer["scores"] = [i["score"] for i in parsed]
        elif kind == "ocr":
            answer = {"quad_boxes": [i["quad_box"] for i in parsed], "labels": [i["text"] for i in parsed]}
        elif kind == "phrase_grounding":
            bboxes, labels = [], []
            for inst in parsed:
                for bbox in inst["bbox"]:
                    bboxes.append(bbox)
                    labels.append(inst["cat_name"])
            answer = {"bboxes": bboxes, "labels": labels}
        elif kind in ("description_with_polygons", "polygons"):
            answer = {"polygons": [i["polygons"] for i in parsed], "labels": [i["cat_name"] for i in parsed]}
        else:  # description_with_bboxes_or_polygons
            answer = {"bboxes": [], "bboxes_labels": [], "polygons": [], "polygons_labels": []}
            for inst in parsed:
                if "polygons" in inst:
                    answer["polygons"].append(inst["polygons"])
                    answer["polygons_labels"].append(inst["cat_name"])
                else:
                    answer["bboxes"].append(inst["bbox"])
                    answer["bboxes_labels"].append(inst["cat_name"])
        return {task: answer}

    def post_process_task(self, generated: Any, task: str, image_size: tuple[int, int]) -> Any:
        """The answer of *task* (any spelling :meth:`task_spec` takes) for generated ids or text: a string for
        text tasks, else the dict :meth:`post_process_generation` describes."""
        spec = self.task_spec(task)
        text = generated if isinstance(generated, str) else self.decode_generation(generated)
        return self.post_process_generation(text, task=spec.token, image_size=image_size)[spec.token]

    def location_tokens(self, coordinates: Sequence[float], image_size: tuple[int, int]) -> str:
        """Pixel coordinates (a box ``x1, y1, x2, y2`` or points ``x, y, ...``) -> ``<loc_..>`` tokens, the
        region input of the ``REGION_TO_*`` tasks (HF ``quantize``: ``floor(x * 1000 / width)``, clamped)."""
        coords = list(coordinates)
        if not coords or len(coords) % 2 or not all(isinstance(c, (int, float)) for c in coords):
            raise ProcessorError(f"coordinates must be an even number of numbers (x, y pairs), got {coordinates!r}")
        size = _check_image_size(image_size)
        t = torch.tensor(coords, dtype=torch.float32).reshape(-1, 4 if len(coords) == 4 else 2)
        return "".join(f"<loc_{int(b)}>" for b in _quantize(t, size).flatten().tolist())

    def processor_config(self) -> dict:
        cfg = super().processor_config()
        cfg["post_processor_config"] = self.post_processor_config
        cfg.setdefault("num_additional_image_tokens", 0)
        if "image_processor" in cfg:
            cfg["image_processor"]["image_seq_length"] = self.num_image_tokens
        return cfg


def _str_or_none(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None
