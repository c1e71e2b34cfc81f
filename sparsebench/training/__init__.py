"""Training machinery shared by every method: the trainer and its hooks, the step budget,
unstructured masks, channel and ViT unit spaces with gating, compaction and the ViT exporter.
Methods decide; this layer does."""
