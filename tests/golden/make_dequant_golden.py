"""Golden dequantizations for src/model/ops/packed.rs: random block bytes of every GGUF format
afinar holds (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K; scales drawn as finite f16), and the
f32 values the `gguf` Python package's `gguf.quants.dequantize` (ggml's reference) gives them.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy
    /tmp/gguf-venv/bin/python tests/golden/make_dequant_golden.py > tests/golden/ggml_dequant.json
"""

import base64
import json
from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

# (format, byte offsets of the f16 fields inside one block)
FORMATS = [
    ("Q4_0", T.Q4_0, [0]),
    ("Q4_1", T.Q4_1, [0, 2]),
    ("Q5_0", T.Q5_0, [0]),
    ("Q5_1", T.Q5_1, [0, 2]),
    ("Q8_0", T.Q8_0, [0]),
    ("Q2_K", T.Q2_K, [80, 82]),
    ("Q3_K", T.Q3_K, [108]),
    ("Q4_K", T.Q4_K, [0, 2]),
    ("Q5_K", T.Q5_K, [0, 2]),
    ("Q6_K", T.Q6_K, [208]),
]


def main():
    rng = np.random.default_rng(7)
    cases = []
    for name, qt, halves in FORMATS:
        block, size = GGML_QUANT_SIZES[qt]
        rows, cols = 3, block * 2
        nbytes = rows * cols // block * size
        raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
        for b in range(nbytes // size):
            for off in halves:
                h = np.float16(rng.uniform(-0.1, 0.1)).view(np.uint16)
                raw[b * size + off] = h & 0xFF
                raw[b * size + off + 1] = h >> 8
        values = dequantize(raw.reshape(rows, nbytes // rows), qt).astype(np.float32)
        cases.append({
            "format": name,
            "rows": rows,
            "cols": cols,
            "bytes_b64": base64.b64encode(raw.tobytes()).decode(),
            "values_f32_b64": base64.b64encode(values.reshape(-1).tobytes()).decode(),
        })
    print(json.dumps({"generator": f"gguf {version('gguf')}", "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
