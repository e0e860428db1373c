"""qaft.training: the qaft-train CLI, config validation, the pipeline, the LightningModule and run records."""
