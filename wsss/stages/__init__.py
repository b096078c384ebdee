"""One module per pipeline stage: ``run(params, paths, ...) -> metrics``. The only layer doing I/O + MLflow."""
