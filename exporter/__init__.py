"""autoglm-export's application layer: export, parity, build, bench, serve and the model loaders.

Imports nothing: importing the model package (exporter.model) must not pull in the layers above it.
"""
