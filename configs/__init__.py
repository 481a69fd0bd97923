"""The shipped run configs (``<task>_<k>.yaml``) as package data, so ``unipelt reproduce`` finds
them from an installed package: ``importlib.resources.files("configs")``."""
