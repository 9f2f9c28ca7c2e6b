"""Evaluation: running a detector over a dataset and scoring it with pycocotools."""
