"""The tinyfuse training engine: data, model, trainer, sampling, evaluation, interop and the CLI."""
