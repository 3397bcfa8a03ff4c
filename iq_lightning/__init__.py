"""iq-lightning: Inverse-Q* (Xia et al., Findings of EMNLP 2024) on Lightning and Hydra."""

__version__ = "0.1.0"
