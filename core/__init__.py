"""Core: what every layer above the model shares.

errors (typed, imported by every layer, imports nothing), the Session protocol and the artifact
directory (artifact.py), recipes and their quantization schemes (recipes.py), the prompt layout and the
host runner (chat.py, runner.py), preprocessing (preprocess.py), the shipped data sets (dataset.py), the
four exportable methods (components.py) and the comparison metrics (metrics.py).
Imports point down only: core imports the model, never calibration, targets or the application.
"""

__version__ = "0.1.0"
