"""Shared pytest set-up. Notebook kernels started by nbval inherit this environment."""
import os

os.environ.setdefault("DSV3_LITE_PROGRESS", "0")  # no progress-bar residue in compared outputs
