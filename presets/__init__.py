"""Preset data (JSON, each with its ``source``): models under ``models/``, GPUs under ``gpus/``,
calibration constants under ``calibration/``. Loaded by ``planner.catalog``; no code here."""
