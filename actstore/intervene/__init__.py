"""Interventions: edit activations with stored probes during generation and score the result."""
