"""The trainer: ``python -m jumprelu_ext.train``. It depends on the SAE and the op library, never
the other way round; importing this package (or its data readers) loads no kernels."""
