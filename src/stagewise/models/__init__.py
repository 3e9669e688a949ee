"""Neural networks only: the torch posterior model (embedding + normalizing flow) and the Keras
Gaussian regression, with the reading and writing of their model files. How they are trained
lives in stagewise.training."""
