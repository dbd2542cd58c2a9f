"""The build's stages, in the order they run (each is a module whose `name` is listed here; edgekit.pipeline
runs them). Plain data, so that any module can read the order without importing a stage."""

ORDER = ("train", "prune", "distill", "quantize", "export", "verify", "bundle")
MODEL_STAGES = ORDER[:4]  # the stages that save a torch model (stages/<name>/model.pt)
