"""Idefics3 and SmolVLM / SmolVLM2 (one implementation; SmolVLM is the same model under another model_type)."""
