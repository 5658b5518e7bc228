"""Recovery: the accuracy budget and the latency-aware choice of each layer's rank, least-squares
refinement, BatchNorm recalibration, fine-tuning, and the list of stages each kept only if validation does not fall."""
