"""Probe targets: label providers and the label sets they write into a store."""
