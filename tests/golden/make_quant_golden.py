"""Golden Q8_0 / Q4_0 blocks for src/export/quant: ggml's reference quantizers as the `gguf`
Python package implements them (`gguf.quants.quantize`), on fixed inputs with the edge cases
(zero blocks, ties in magnitude, exact .5 steps, tiny and huge values).

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy
    /tmp/gguf-venv/bin/python tests/golden/make_quant_golden.py > tests/golden/ggml_quants.json
"""

import json
import sys

import numpy as np
import gguf
from importlib.metadata import version
from gguf.quants import quantize


def inputs():
    rng = np.random.default_rng(1234)
    rows = []
    rows.append(rng.standard_normal(256).astype(np.float32))           # 8 ordinary blocks
    rows.append((rng.standard_normal(64) * 1e-6).astype(np.float32))   # tiny values
    rows.append((rng.standard_normal(64) * 3e4).astype(np.float32))    # huge values (f16 range)
    z = np.zeros(64, dtype=np.float32)
    z[40] = 1.0                                                         # one zero block, one spike
    rows.append(z)
    t = np.linspace(-1, 1, 32, dtype=np.float32)
    t[0], t[31] = -2.0, 2.0                                             # tie: -max first
    rows.append(np.concatenate([t, -t]))
    steps = (np.arange(32, dtype=np.float32) - 16) / 16 * 127 / 127    # multiples of 1/16
    rows.append(np.concatenate([steps, steps * 8.5 / 8]))              # exact .5 roundings
    rows.append(rng.uniform(-1, 1, 32).astype(np.float32))
    return rows


def main():
    cases = []
    for x in inputs():
        case = {"input": [float(v) for v in x]}
        for name, qt in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)):
            case[name] = quantize(x.reshape(1, -1), qt).tobytes().hex()
        cases.append(case)
    json.dump({"source": "gguf.quants.quantize, gguf " + version("gguf"),
               "cases": cases}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
