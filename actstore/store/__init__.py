"""The Zarr v3 store: layout, codecs, block writes with completion records, and the reader."""
