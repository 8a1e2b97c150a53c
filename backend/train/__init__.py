"""Preference fine-tuning: SPO (online, step-aware) and, on the same loop, Diffusion-DPO / -RPO."""
