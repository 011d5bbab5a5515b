"""mlgate: validated ingestion to Kafka and batched ONNX prediction behind one HTTP contract.

One import namespace mapped from the repository's top-level folders (see pyproject.toml):
``mlgate.service`` (the HTTP app), ``mlgate.workers`` (the actors), ``mlgate.schemas``
(wire types) and ``mlgate.config`` (settings). In a checkout those four are symlinks to
the folders, so the tree imports exactly as the installed wheel does.
"""

from mlgate.service import __version__

__all__ = ["__version__"]
