"""The step-aware preference model (SPM): model, data, loss, training, scoring and evaluation."""
