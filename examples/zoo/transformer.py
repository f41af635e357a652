"""A one-layer transformer encoder over continuous embeddings: each 8×8 digit is a sequence of 8 rows."""

import torch
from torch import nn

from _digits import digits, fit


class RowTransformer(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(8, width))
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.encoder(self.embed(x.reshape(-1, 8, 8)) + self.position)
        return self.head(h.mean(dim=1))


def model():
    return RowTransformer()


def data():
    return digits()


def train(net, x, y, steps=400):
    return fit(net, x, y, torch.optim.Adam(net.parameters(), lr=3e-3), steps)


if __name__ == "__main__":  # trains it and writes transformer.pt: stands in for your own trained model
    torch.manual_seed(0)
    x, y, _, _ = data()
    torch.save(train(model(), x, y).state_dict(), "transformer.pt")
