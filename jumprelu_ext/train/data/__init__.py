"""Where activations come from: activation files (such as ``python -m jumprelu_ext.harvest`` writes),
or a model run over text."""
