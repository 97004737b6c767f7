"""The wire contract and settings: imports nothing of ours."""
from schemas.settings import Settings

__all__ = ["Settings"]
