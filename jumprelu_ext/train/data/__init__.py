"""Where activations come from: files of cached activations, or a model run over text."""
