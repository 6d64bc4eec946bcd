"""Networks, the `Pipeline` that puts preprocessing in front of them, and the module export traces.

A `Pipeline` maps raw inputs to logits (classification) or a standardized value (regression) for
training. `Pipeline.outputs` adds the inference head the graph exposes: class probabilities and the
label index for classifiers, the value in target units for regressors. `GraphModule` is what export
traces; the graph's tensor names come from `app.model_card` (`INPUT_NAMES`, `OUTPUT_NAMES`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from app.model_card import OUTPUT_NAMES, Modality, Task
from trainer.config import ALLOWED_ARCHITECTURES, DEFAULT_ARCHITECTURE, Architecture, ModelConfig
from trainer.errors import ConfigError


def resolve_architecture(requested: str, modality: Modality) -> Architecture:
    """The architecture to build: the config's choice, or the default for the data when `auto`.

    Raises:
        ConfigError: the architecture does not fit the kind of data (e.g. a CNN on tabular rows).
    """
    if requested == "auto":
        return DEFAULT_ARCHITECTURE[modality]
    allowed = ALLOWED_ARCHITECTURES[modality]
    if requested not in allowed:
        raise ConfigError(
            f"model.architecture '{requested}' does not fit {modality} data; use one of {allowed}"
        )
    return requested


class MLP(nn.Module):
    """Fully connected layers with ReLU and dropout; flattens any input to [N, features]."""

    def __init__(self, in_features: int, hidden_sizes: list[int], out_features: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(x)
        return logits


class CNN(nn.Module):
    """Blocks of two 3×3 convs + ReLU + 2×2 max-pool (none once the map is 1 pixel), then an MLP head."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        channels: list[int],
        hidden_size: int,
        out_features: int,
        dropout: float,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        depth, height, width = in_shape
        for out_channels in channels:
            blocks += [
                nn.Conv2d(depth, out_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                nn.ReLU(),
            ]
            if min(height, width) >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            depth = out_channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(depth * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def last_real_step(outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """outputs [N, T, H] at each row's last true mask position → [N, H] (right padding assumed)."""
    last = (mask.to(torch.int64).sum(dim=1) - 1).clamp(min=0)
    index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
    return outputs.gather(1, index).squeeze(1)


class RecurrentNet(nn.Module):
    """GRU or LSTM over right-padded sequences; the state at the last real step feeds a linear head.

    Steps after a row's end are computed but never read, so padding does not change the result.
    """

    def __init__(
        self,
        kind: str,
        in_channels: int,
        hidden_size: int,
        num_layers: int,
        out_features: int,
        dropout: float,
    ) -> None:
        super().__init__()
        rnn_class = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = rnn_class(
            in_channels, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, out_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(x)
        logits: torch.Tensor = self.head(last_real_step(outputs, mask))
        return logits


def sinusoidal_positions(length: int, d_model: int, like: torch.Tensor) -> torch.Tensor:
    """[length, d_model] sine/cosine position codes, computed for any length (no fixed maximum)."""
    position = torch.arange(length, dtype=like.dtype, device=like.device).unsqueeze(1)
    half = torch.arange(0, d_model, 2, dtype=like.dtype, device=like.device)
    angle = position * torch.exp(half * (-math.log(10000.0) / d_model))
    codes = torch.stack([torch.sin(angle), torch.cos(angle)], dim=2)
    return codes.flatten(1)[:, :d_model]


class TransformerNet(nn.Module):
    """Transformer encoder over right-padded sequences with a key-padding mask and masked mean pooling."""

    def __init__(
        self,
        in_channels: int,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        out_features: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Linear(in_channels, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        # Nested tensors are a prototype fast path that neither exports nor keeps padded == unpadded.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, out_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x) + sinusoidal_positions(x.shape[1], self.d_model, x)
        # A row with no real step would mask every key and turn attention into NaN: let it see all.
        ignore = ~mask & mask.any(dim=1, keepdim=True)
        hidden = self.encoder(hidden, src_key_padding_mask=ignore)
        weights = mask.to(hidden.dtype).unsqueeze(2)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits: torch.Tensor = self.head(self.norm(pooled))
        return logits


def build_network(
    architecture: Architecture, config: ModelConfig, in_shape: tuple[int, ...], out_features: int
) -> nn.Module:
    """The network for preprocessed inputs of `in_shape` (one row, no batch axis)."""
    if architecture == "mlp":
        return MLP(math.prod(in_shape), config.mlp.hidden_sizes, out_features, config.mlp.dropout)
    if architecture == "cnn":
        depth, height, width = in_shape
        return CNN(
            (depth, height, width),
            config.cnn.channels,
            config.cnn.hidden_size,
            out_features,
            config.cnn.dropout,
        )
    if architecture in ("gru", "lstm"):
        rnn = config.rnn
        return RecurrentNet(
            architecture, in_shape[-1], rnn.hidden_size, rnn.num_layers, out_features, rnn.dropout
        )
    t = config.transformer
    return TransformerNet(
        in_shape[-1], t.d_model, t.nhead, t.num_layers, t.dim_feedforward, out_features, t.dropout
    )


class Pipeline(nn.Module):
    """Preprocessing (fitted, in the graph) + network; regression targets are learnt standardized.

    `forward` gives what the loss needs (logits, or the standardized value [N, 1]); `outputs` gives
    what the exported graph returns.
    """

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        preprocess: nn.Module,
        network: nn.Module,
        *,
        task: Task,
        modality: Modality,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.task = task
        self.modality = modality
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.preprocess(x)
        raw: torch.Tensor = self.network(x) if mask is None else self.network(x, mask)
        return raw

    def outputs(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The graph outputs: (probabilities, label_index) or (value,) in target units."""
        raw = self(x, mask)
        if self.task == "classification":
            return torch.softmax(raw, dim=1), torch.argmax(raw, dim=1)
        return (raw[:, 0] * self.target_std + self.target_mean,)

    def output_names(self) -> tuple[str, ...]:
        """Names of `outputs`, in order."""
        return OUTPUT_NAMES[self.task]


class GraphModule(nn.Module):
    """What export traces: a pipeline's graph outputs from its raw inputs, in `INPUT_NAMES` order."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.pipeline.outputs(x, mask)
