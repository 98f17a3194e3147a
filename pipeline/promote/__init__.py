"""Promotion: candidates, the gate, the lock, the decision record, model cards, ensembles (`pneumo promote`)."""
