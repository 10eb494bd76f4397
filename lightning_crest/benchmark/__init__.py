"""Benchmark building blocks: datasets (``benchmark.data``) and small vision models (``benchmark.models``).

The submodules import torchvision, which is an optional dependency (``lightning-crest[vision]``), so
this package deliberately imports nothing at load time.
"""
