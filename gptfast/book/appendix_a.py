"""Appendix A, introduction to PyTorch: the small classifier and data set it trains."""

import torch
from torch.utils.data import Dataset

__all__ = ["NeuralNetwork", "ToyDataset"]


class NeuralNetwork(torch.nn.Module):
    """A multilayer perceptron: num_inputs -> 30 -> ReLU -> 20 -> ReLU -> num_outputs (logits)."""

    def __init__(self, num_inputs, num_outputs):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(num_inputs, 30), torch.nn.ReLU(),  # first hidden layer
            torch.nn.Linear(30, 20), torch.nn.ReLU(),  # second hidden layer
            torch.nn.Linear(20, num_outputs),  # output layer
        )

    def forward(self, x):  # (B, num_inputs) -> (B, num_outputs)
        return self.layers(x)


class ToyDataset(Dataset):
    """Features ``X`` (N, F) and labels ``y`` (N,) as ``(features[i], labels[i])`` pairs."""

    def __init__(self, X, y):
        self.features = X
        self.labels = y

    def __getitem__(self, index):
        return self.features[index], self.labels[index]

    def __len__(self):
        return self.labels.shape[0]
