"""polyquant SSM plugin: Quamba-style W8A8 for ``transformers`` Mamba (see ``methods.py``)."""
