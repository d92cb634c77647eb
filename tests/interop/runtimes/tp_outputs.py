"""What a served digit classifier reveals under an output spec, written as a serving team would write it.

Shared by the MLServer and KServe runtimes of the interoperability tests. Deliberately independent
of tamperprobe (numpy only): the tests check that tamperprobe reads what an ordinary runtime sends,
not what tamperprobe's own server sends. Specs: ``top1``, ``topk:K``, ``top1-prob:N``, ``probs:N``,
``logits``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the models a runtime loaded in this process, by name (MLServer reloads a runtime's module for each model;
# this module is imported once)
LOADED: dict[str, Any] = {}

# Open Inference Protocol datatype of each output name
DATATYPES = {"label": "INT64", "labels": "INT64", "probability": "FP64", "probabilities": "FP64", "logits": "FP32"}


def parse_spec(spec: str) -> tuple[str, int]:
    """("topk", 3) for "topk:3"; the number is 0 for the specs without one."""
    kind, _, arg = spec.partition(":")
    return kind, int(arg or 0)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tensors(logits: np.ndarray, spec: str) -> dict[str, np.ndarray]:
    """The output tensors (batch first) for a batch of logits (B, C): label(s), probabilities or logits."""
    kind, n = parse_spec(spec)
    z = np.asarray(logits, dtype=np.float32)
    order = np.argsort(-z.astype(np.float64), axis=1, kind="stable")
    if kind == "top1":
        return {"label": order[:, :1].astype(np.int64)}
    if kind == "topk":
        return {"labels": order[:, :n].astype(np.int64)}
    p = softmax(z)
    if kind == "top1-prob":
        top = order[:, :1]
        return {"label": top.astype(np.int64), "probability": np.round(np.take_along_axis(p, top, axis=1), n)}
    if kind == "probs":
        return {"probabilities": np.round(p, n)}
    if kind == "logits":
        return {"logits": z}
    raise ValueError(f"unknown output spec {spec!r}")


def output_metadata(spec: str, classes: int) -> list[dict[str, Any]]:
    """The outputs' metadata (name, datatype, shape with -1 for the batch) a model under ``spec`` declares."""
    example = tensors(np.zeros((1, classes), dtype=np.float32), spec)
    return [{"name": k, "datatype": DATATYPES[k], "shape": [-1, int(v.shape[1])]} for k, v in example.items()]


def named(row_logits: np.ndarray, spec: str) -> dict[str, Any]:
    """One prediction as a JSON object of named outputs: {"label": 3}, {"labels": [3, 5, 8]}, {"probabilities": [...]}, ..."""
    out: dict[str, Any] = {}
    for name, value in tensors(np.asarray(row_logits)[None, :], spec).items():
        row = value[0].tolist()
        out[name] = row[0] if name in ("label", "probability") else row
    return out


def v1_prediction(row_logits: np.ndarray, spec: str) -> Any:
    """One element of a KServe v1 / TF-Serving ``predictions`` list: a plain label for top1 (as scikit-learn
    servers answer), a plain probability list for probs:N (predict_proba), else the named outputs."""
    kind, _ = parse_spec(spec)
    d = named(row_logits, spec)
    if kind == "top1":
        return d["label"]
    if kind == "probs":
        return d["probabilities"]
    return d


def tf_topk(row_logits: np.ndarray, k: int, decimals: int = 4) -> dict[str, Any]:
    """A top-k prediction as a TensorFlow model with ``tf.math.top_k`` outputs answers it:
    ``{"classes": [k labels], "scores": [their probabilities]}``, most likely first."""
    p = softmax(np.asarray(row_logits)[None, :])[0]
    order = np.argsort(-np.asarray(row_logits, dtype=np.float64), kind="stable")[:k]
    return {"classes": [int(c) for c in order], "scores": [round(float(p[c]), decimals) for c in order]}
