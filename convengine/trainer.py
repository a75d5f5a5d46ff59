"""The training loop: fit, evaluate and predict a Sequential model."""


class Trainer:
    """Fit a model with a loss and an optimizer."""

    def __init__(self, model, loss, optimizer):
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
