import sys
from pathlib import Path

# tests/tiny.py (tiny HF tokenizers/processors) and tests/parity/vlm_checks.py are plain helper modules
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
