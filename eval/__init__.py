"""Evaluation: FID-Whole, FID-Patch and text alignment of exported models (eval/fid_patch.py is the CLI)."""
