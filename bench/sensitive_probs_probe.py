"""Probe: how sensitive are the `sensitive` markers under probs:2, revision by revision?

Runs against whatever ``tamperprobe`` is on PYTHONPATH (old layout before 3f0d848 or new), on one
fixed MNIST CNN (a state_dict trained once, ``--train`` writes it), so that only the marker
generation differs between revisions. The bag is drawn as the campaign does (the train part of
the seeded 7,000/3,000 split, rng and torch seeded with crc32("0|method|sensitive")).

For the bag it reports, measured by this script alone (independent of the revision's code):

* the trigger ratio under probs:2 (softmax rounded to 2 decimals; a marker triggers when any of its
  10 rounded probabilities changes) for fp16 and bf16 round-trips of every weight;
* S = ||J||_F^2 (||h||^2 + 1) in float64 (the default W: last layer's weight and bias), seeds and markers;
* the top probability of the markers, the share of markers whose softmax is saturated (top > 0.995);
* the ascent steps each sample took (when the revision records them).

    python bench/sensitive_probs_probe.py --train /tmp/probe/cnn.pt              # once
    PYTHONPATH=<rev>/src python bench/sensitive_probs_probe.py --state /tmp/probe/cnn.pt --label <rev> [--param patience=0]
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

DATA = Path("/work/shared/data/mnist")


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(["0", *map(str, parts)]).encode()) & 0x7FFFFFFF


def _wrap(module):
    try:
        from tamperprobe.models import TorchModel  # after b07c0f5

        return TorchModel(module, "tamperprobe.zoo:mnist_cnn")
    except ImportError:
        from tamperprobe.models import LoadedModel

        return LoadedModel(source="tamperprobe.zoo:mnist_cnn", kind="module", module=module)


def _get_method(name, **params):
    try:
        from tamperprobe.owner.methods import get_method
    except ImportError:
        from tamperprobe.methods import get_method
    return get_method(name, **params)


def _probs2(module, x):
    with torch.no_grad():
        p = torch.softmax(module(torch.from_numpy(x)).double(), dim=1).numpy()
    return np.round(p, 2)


def _roundtrip(module, dtype):
    import copy

    m = copy.deepcopy(module)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return m


def _sensitivity(module, x):
    """S over the last nn.Linear's weight and bias, float64: ||J||^2 (||h||^2 + 1), J = diag(p) - p p^T."""
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = {}
    hook = last.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("h", inp[0].detach()))
    with torch.no_grad():
        z = module(torch.from_numpy(x))
    hook.remove()
    p = torch.softmax(z.double(), dim=1)
    jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    j2 = (jac**2).sum(dim=(1, 2))
    h2 = (seen["h"].double() ** 2).sum(dim=1)
    return (j2 * (h2 + 1)).numpy(), p.max(dim=1).values.numpy()


def train(path: Path) -> None:
    from tamperprobe import zoo
    from tamperprobe.data import load_data
    from tamperprobe.train import accuracy, fit

    data = load_data(DATA)
    tr, te = data.split(0.3, seed=0)
    torch.manual_seed(0)
    module = zoo.build("cnn", (1, 28, 28))
    fit(module, tr.x, tr.y, epochs=8, lr=1e-3, seed=0)
    print("test accuracy", accuracy(module, te.x, te.y))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)


def probe(args) -> dict:
    from tamperprobe import zoo
    from tamperprobe.data import load_data

    data = load_data(DATA)
    tr, _ = data.split(0.3, seed=0)
    module = zoo.build("cnn", (1, 28, 28))
    module.load_state_dict(torch.load(args.state))
    module.eval()
    model = _wrap(module)
    params = {}
    for kv in args.param:
        k, v = kv.split("=", 1)
        params[k] = json.loads(v)
    method = _get_method("sensitive", **params)
    if args.old_draw:  # the seed draw of 2b23006 (rng.choice without replacement) instead of sample_indices (2ddb14a)
        import importlib

        mod = importlib.import_module(type(method).__module__)
        if hasattr(mod, "sample_indices"):
            mod.sample_indices = lambda n, k, rng: rng.choice(n, size=k, replace=k > n)
    seed = _seed("method", "sensitive") if args.draw_seed is None else args.draw_seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bag = method.generate(model, tr, args.bag, rng, None)
    x = np.ascontiguousarray(bag.inputs, dtype=np.float32)
    seeds = np.ascontiguousarray(bag.seeds, dtype=np.float32)
    ref = _probs2(module, x)
    out = {"label": args.label + (" old-draw" if args.old_draw else ""), "params": params, "bag": len(x), "draw_seed": seed}
    out["seeds_digest"] = zlib.crc32(seeds.tobytes()) & 0xFFFFFFFF
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        changed = (_probs2(_roundtrip(module, dt), x) != ref).any(axis=1)
        out[f"trigger_{name}"] = float(changed.mean())
        out[f"changed_{name}"] = np.flatnonzero(changed).tolist()
    s, top = _sensitivity(module, x)
    s0, top0 = _sensitivity(module, seeds)
    q = lambda a: [float(np.quantile(a, t)) for t in (0.1, 0.5, 0.9)]  # noqa: E731
    out.update(
        S_markers_q10_50_90=q(s),
        S_seeds_q10_50_90=q(s0),
        S_gain_median=float(np.median(s / np.maximum(s0, 1e-300))),
        top_markers_q10_50_90=q(top),
        saturated_markers=float((top > 0.995).mean()),
        saturated_seeds=float((top0 > 0.995).mean()),
        distance_rel_median=float(
            np.median(np.linalg.norm((x - seeds).reshape(len(x), -1), axis=1) / np.linalg.norm(seeds.reshape(len(x), -1), axis=1))
        ),
    )
    steps = bag.info.get("ascent_steps")
    out["ascent_steps_q10_50_90"] = q(np.asarray(steps)) if steps is not None else [bag.info.get("steps")] * 3
    np.savez_compressed(args.save, x=x, seeds=seeds, s=s, s0=s0) if args.save else None
    return out


def evaluate(args) -> None:
    """run_evaluation for sensitive x fp16/bf16 x probs:2 (1 trial), detection at N_S = 1, 5, 10 and the changed markers."""
    from tamperprobe import zoo
    from tamperprobe.data import load_data

    try:
        from tamperprobe.evaluation import run_evaluation
    except ImportError:  # before 3f0d848
        from tamperprobe.evaluate import run_evaluation
    if args.old_draw:
        import tamperprobe.owner.methods.sensitive as sens

        sens.sample_indices = lambda n, k, rng: rng.choice(n, size=k, replace=k > n)
    module = zoo.build("cnn", (1, 28, 28))
    module.load_state_dict(torch.load(args.state))
    module.eval()
    kw = dict(methods=["sensitive"], attacks=["fp16", "bf16"], specs=["probs:2"], trials=1, bag=args.bag, seed=0, baselines=False, runtimes=())
    if "attack_samples" in run_evaluation.__code__.co_varnames:
        kw["attack_samples"] = None
    ev = run_evaluation(_wrap(module), load_data(DATA), **kw)
    det = [(d["attack"], d["ns"], round(d["rate"], 4)) for d in ev.detection if d["ns"] in (1, 5, 10)]
    print(json.dumps({"label": args.label + (" old-draw" if args.old_draw else ""), "state": str(args.state), "detection": det}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path)
    ap.add_argument("--state", type=Path, default=Path("/tmp/probe/cnn.pt"))
    ap.add_argument("--label", default="")
    ap.add_argument("--bag", type=int, default=100)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--save", type=Path)
    ap.add_argument("--draw-seed", type=int, help="another rng seed for the bag (default: the campaign's)")
    ap.add_argument("--old-draw", action="store_true", help="draw the seeds as 2b23006 did (rng.choice)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--evaluate", action="store_true", help="run_evaluation detection instead of the direct probe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.train:
        train(args.train)
        return
    if args.evaluate:
        evaluate(args)
        return
    out = probe(args)
    line = json.dumps(out)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
