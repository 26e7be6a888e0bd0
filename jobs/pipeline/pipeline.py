"""The seed's preprocess, as an [input] preprocess of jobs/pipeline/job.toml."""


def add_preprocess(batch):
    """x + x, as the seed's add_preprocess; y goes to graph 1 as it is."""
    return {"x": batch["x"] + batch["x"], "y": batch["y"]}
