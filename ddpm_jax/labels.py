"""The class label that means "no label", shared by the data, the model and the samplers."""

# An unlabelled record's label, and the label that selects a conditional U-Net's unconditional embedding row (a
# guided sampler's second half, a label dropped in training).
NO_LABEL = -1
