"""Weights shipped with the project (see MODEL_CARD.md)."""
