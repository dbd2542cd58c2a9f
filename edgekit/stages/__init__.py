"""The build's stages, in the order they run (each is a module of this package whose `name` is listed here;
edgekit.stages.base describes the contract and edgekit.pipeline runs them). Plain data, so that any module can
read the order without importing a stage."""

ORDER = ("train", "prune", "distill", "quantize", "export", "verify", "bundle", "measure", "check", "report")
MODEL_STAGES = ORDER[:4]  # the stages that save a torch model (stages/<name>/model.pt)
