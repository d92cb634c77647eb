"""Command-line options shared by several commands, each declared once (``Annotated`` aliases).

A command writes ``weights: WeightsOption = None`` instead of repeating the declaration, so a
shared option has one name, one help text and one default everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

ModelArgument = Annotated[
    str, typer.Argument(help="Model: .pt (TorchScript), .pt2 (torch.export), .onnx, or package.module:attribute (an nn.Module, class or factory).")
]
FingerprintArgument = Annotated[Path, typer.Argument(metavar="FP", help="Fingerprint file.")]
WeightsOption = Annotated[
    Optional[str], typer.Option("--weights", help=".safetensors or state_dict file for the model (read without unpickling code).")
]
DataOption = Annotated[str, typer.Option("--data", help="Natural inputs: .npz with x (and y), an IDX folder, or digits / mnist5k.")]
LowOption = Annotated[Optional[float], typer.Option("--low", help="Lower end of the input range (default: inferred from the data).")]
HighOption = Annotated[Optional[float], typer.Option("--high", help="Upper end of the input range (default: inferred from the data).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of every random choice.")]
ParamOption = Annotated[Optional[List[str]], typer.Option("--param", help="Hyper-parameter key=value (repeatable), e.g. epsilon=0.1.")]
ThreadsOption = Annotated[Optional[int], typer.Option("--threads", help="Torch threads for running the model.")]
HistoryOption = Annotated[
    Optional[Path], typer.Option("--history", help="SQLite history file (default: $TAMPERPROBE_HISTORY or the user data folder).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
