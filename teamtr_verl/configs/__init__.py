"""Hydra configs of teamtr-verl (a package so that recipes can add `pkg://teamtr_verl.configs` to their searchpath)."""
