"""torchvlm: pure-PyTorch vision-language models.

    import torchvlm
    model, processor = torchvlm.load("path/or/hub-id")
    print(torchvlm.generate(model, processor, "What is in this image?", images=["cat.jpg"]))
"""

__version__ = "0.1.0"

from .api import build_messages, generate, load, load_processor, run_task, stream_generate  # noqa: E402
from .errors import TorchVLMError  # noqa: E402
from .generation.sampling import SamplingParams  # noqa: E402
from .models.base import VLM  # noqa: E402
from .processing.processor import Processor  # noqa: E402

__all__ = [
    "VLM", "Processor", "SamplingParams", "TorchVLMError",
    "load", "load_processor", "generate", "stream_generate", "build_messages", "run_task",
]
