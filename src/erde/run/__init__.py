"""The run folder: its layout, files (weights, model.json, report.json) and the writer's lock."""
