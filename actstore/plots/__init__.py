"""PNG figures drawn from a store."""
