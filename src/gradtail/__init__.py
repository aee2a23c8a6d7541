"""gradtail: gradient-driven long-tailed recognition.

Methods (Equalization losses, GALA, BGP, GBG), the baselines they are measured against, and the
harness that compares them. See the README for a map of the package.
"""

__version__ = "0.1.0"
