"""Exhaustive comparison of two E8M0 scale rules (a script, not a test):
``python -m benchmarks.e8m0_rules``.

For every positive finite fp32 amax (2^31 - 2^23 values, in chunks), counts the amaxes whose E8M0
code differs between two rules of ``nvfp4bench.quant.mx`` (default: ``te``, Transformer Engine's
product with the fp32 reciprocal of the element's max, and ``rceil``, the exact quotient), for
E2M1 and E4M3 elements. Prints one JSON object; took 12 minutes on one core of a loaded
2-core machine.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from nvfp4bench.quant import mx

POSITIVE_FINITE_END = 0x7F800000  # the bits of +inf: every positive finite fp32 lies below


def differing_codes(rule_a: str, rule_b: str, chunk_bits: int = 24, first: int = 0,
                    end: int = POSITIVE_FINITE_END, progress: bool = True) -> dict:
    """Per element type: how many fp32 amaxes, by bit pattern from ``first`` to ``end`` (default:
    every positive finite one), get different codes, and the first few of them."""
    step = 1 << chunk_bits
    found = {element.name: {"differ": 0, "examples": []} for element in (mx.E2M1, mx.E4M3)}
    for start in tqdm(range(first, end, step), desc="fp32 amax", unit="chunk",
                      disable=not progress):
        amax = torch.arange(start, min(start + step, end), dtype=torch.int32).view(torch.float32)
        for element in (mx.E2M1, mx.E4M3):
            differ = mx.e8m0_codes(amax, element, rule_a) != mx.e8m0_codes(amax, element, rule_b)
            entry = found[element.name]
            entry["differ"] += int(differ.sum())
            entry["examples"] += amax[differ][:max(0, 5 - len(entry["examples"]))].tolist()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e8m0_rules",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="te,rceil", help="two rules of mx.SCALE_RULES")
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    if len(rules) != 2 or not set(rules) <= set(mx.SCALE_RULES):
        parser.error(f"--rules takes two of {', '.join(mx.SCALE_RULES)}, got {args.rules!r}")
    started = time.perf_counter()
    result = differing_codes(*rules)
    print(json.dumps({"rules": rules, "amax": "every positive finite fp32", **result,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
