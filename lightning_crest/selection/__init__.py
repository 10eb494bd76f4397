"""Coreset selection: gradient proxies and weighted facility location (pure torch, no Lightning)."""

from lightning_crest.selection._facility_location import (
    Selection,
    class_budgets,
    facility_location,
    facility_location_objective,
)
from lightning_crest.selection._gradients import gradient_proxy, last_layer_sketch

__all__ = [
    "Selection",
    "class_budgets",
    "facility_location",
    "facility_location_objective",
    "gradient_proxy",
    "last_layer_sketch",
]
