"""Switches read from the environment, parsed one way everywhere."""

from __future__ import annotations

import os

TRUE_WORDS = ("1", "true", "yes", "on")


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true word (1, true, yes, on; any case, spaces ignored)."""
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: nothing may be downloaded from the Hugging Face hub, only cached weights used."""
    return env_flag("HF_HUB_OFFLINE")
