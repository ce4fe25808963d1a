"""mmtrain: distributed pretraining of early-fusion multimodal Transformers.

Importing this package has no side effects: no argument parsing, no process group, no threads.
"""

__version__ = "0.1.0"
