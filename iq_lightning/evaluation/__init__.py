"""Evaluation as in the paper: pairwise judging, win rates, Elo, reward-model curves and
token-credit maps (`python evaluate.py`)."""
