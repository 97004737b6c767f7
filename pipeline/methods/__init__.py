"""The method registry: one name -> class table, read by settings, CLI, evaluator and workers.

Adding a method touches its own file in this package, its line here, and its tests.
Classes are imported on first use, so reading the names (``interneg --help``) costs nothing.
"""
from __future__ import annotations

from importlib import import_module

from pipeline.errors import ConfigError

# in the order of the evaluator's table: baselines first, by year
METHODS: dict[str, str] = {
    "mcm": "pipeline.methods.mcm:MCM",
    "neglabel": "pipeline.methods.neglabel:NegLabel",
    "csp": "pipeline.methods.csp:CSP",
    "adaneg": "pipeline.methods.adaneg:AdaNeg",
    "interneg": "pipeline.methods.interneg:InterNeg",
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


class UnknownMethod(ConfigError):
    """A method name the registry does not know."""


def method_class(name: str):
    """The scorer class registered under ``name``."""
    try:
        module, _, cls = METHODS[name].partition(":")
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}: choose from {', '.join(METHOD_NAMES)}") from None
    return getattr(import_module(module), cls)


def scorer_from_bundle(bundle, settings, method: str | None = None, inverter=None):
    """The scorer a setting (or ``method``) names, built from a prepared bundle."""
    return method_class(method or settings.method.method).from_bundle(bundle, settings, inverter)
