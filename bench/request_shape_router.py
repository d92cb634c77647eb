"""A request-shape router against tamperprobe's requests: how many would it send to the original model?

The operator's router (issue 18): learn every request shape (request line, header names, order and
values, JSON skeleton and format, binary size) that an ordinary python-requests client sends with
natural inputs, then flag any request of another shape, and any request whose KServe ``id`` starts
with ``tp-`` (the free tell). This script runs three verifications (2 markers and 2 decoys each,
shuffled) per protocol through whatever ``tamperprobe`` is on the path, counts the flagged requests,
and writes ``bench/results/request-shape-router.md`` (``--out``). Run it with the branch's and with
main's code on PYTHONPATH to compare. Everything stays on 127.0.0.1.

    PYTHONPATH=src python bench/request_shape_router.py --label branch
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tamperprobe.served.clients import make_client  # noqa: E402
from tamperprobe.served.pool import Draw  # noqa: E402
from tamperprobe.served.verify import verify  # noqa: E402
from wire import (  # noqa: E402 - the capture server and shape function the tests use
    CLASSES,
    PROTOCOLS,
    SHAPE,
    TEMPLATE,
    TOKEN,
    CaptureServer,
    endpoint,
    pool_fingerprint,
    request_shape,
    requests_script,
)


def run(protocol: str) -> dict:
    import os

    os.environ["TP_BENCH_TOKEN"] = TOKEN
    with CaptureServer() as server:
        natural = np.random.default_rng(5).random((6, *SHAPE)).astype(np.float32)
        requests_script(protocol, server.url, natural, "none")
        requests_script(protocol, server.url, natural[:2], "bearer")
        learned = {request_shape(c) for c in server.take()}
        fp = pool_fingerprint(6, 6)
        template = json.dumps(TEMPLATE) if protocol == "json" else None
        verdicts = []
        for r, token in enumerate([None, None, "TP_BENCH_TOKEN"]):
            client = make_client(
                protocol, endpoint(protocol, server.url), model_name="m", template=template, retries=0, classes=CLASSES, token_env=token
            )
            draw = Draw((2 * r, 2 * r + 1), (2 * r, 2 * r + 1), tuple(np.random.default_rng(r).permutation(4).tolist()), "fresh")
            with client:
                verdicts.append(verify(fp, client, draw=draw).verdict)
        ours = server.take()
    shape = [c for c in ours if request_shape(c) not in learned]
    tp_id = [c for c in ours if b'"id": "tp-' in c.body or b'"id":"tp-' in c.body]
    infer = [c for c in ours if not c.raw.startswith(b"GET ")]
    flagged_infer = [c for c in infer if request_shape(c) not in learned or c in tp_id]
    return {
        "protocol": protocol,
        "requests": len(ours),
        "flagged": len(shape),
        "tp_id": len(tp_id),
        "infer": len(infer),
        "infer_flagged": len(flagged_infer),
        "verdicts": verdicts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "request-shape-router.md")
    args = ap.parse_args()
    rows = [run(p) for p in PROTOCOLS]
    lines = [
        f"\n## {args.label}\n",
        "| protocol | requests | flagged by shape | with a `tp-` id | marker/decoy requests flagged | verdicts |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['requests']} | {r['flagged']} | {r['tp_id']} | {r['infer_flagged']} of {r['infer']} | {', '.join(r['verdicts'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.out.exists():
        header = (
            "# Request-shape router against tamperprobe's requests\n\n"
            "`bench/request_shape_router.py`: a router learns every request shape of a python-requests client (natural inputs, "
            "with and without a bearer token) and flags any other shape; three verifications (2 markers + 2 decoys each) per protocol. "
            "A flagged marker or decoy request is one the operator would answer with the original model. The ordinary kserve "
            "client here reads the model metadata once, as tamperprobe's does; a router that never saw a metadata GET would flag "
            "that one request per process (it carries no marker; a profile file with `input` removes it).\n"
        )
        args.out.write_text(header)
    with args.out.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
