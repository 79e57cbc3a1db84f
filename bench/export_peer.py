#!/usr/bin/env python3
"""The Python route to a quantized GGUF, timed: every tensor of a Hugging Face safetensors model
quantized with the `gguf` package's `quants.quantize` (numpy) and written with its `GGUFWriter`
— the tensor path of llama.cpp's convert_hf_to_gguf.py (no tokenizer metadata: that part costs
little). `export_peer.py MODEL_DIR OUT.gguf q8_0|q4_0`; prints `RESULT {json}` last."""
import json, resource, sys, time

import numpy as np
import gguf
try:
    import torch  # noqa: F401 (safetensors' "pt" framework)
    from safetensors import safe_open
except ImportError:
    torch = None

def numpy_tensors(path):
    """(name, f32 array) of a safetensors file, in name order, read with numpy alone (bf16
    widened as torch's .float() does): the reader when torch is not installed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    for name in sorted(k for k in header if k != "__metadata__"):
        h = header[name]
        a, b = h["data_offsets"]
        dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[h["dtype"]]
        x = np.fromfile(path, dtype=dt, count=(b - a) // np.dtype(dt).itemsize, offset=8 + n + a)
        if h["dtype"] == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        yield name, x.astype(np.float32, copy=False).reshape(h["shape"])

def tensors(path):
    if torch is None:
        yield from numpy_tensors(path)
        return
    with safe_open(path, framework="pt") as st:
        for name in st.keys():
            yield name, st.get_tensor(name).float().numpy()

def main():
    src, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(out, "qwen2")
    import glob, os
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    n = 0
    for f in files:
        for name, x in tensors(f):
            # As llama-quantize: 1-D tensors (norms, biases) stay f32.
            if x.ndim == 1 or x.shape[-1] % 32 != 0:
                w.add_tensor(name, x.astype(np.float32))
            else:
                q = gguf.quants.quantize(x, qtype)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            n += x.size
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"tool": "gguf-py", "gguf": getattr(gguf, "__version__", "?"),
                                  "dtype": dtype, "reader": "torch" if torch else "numpy", "parameters": n, "seconds": secs,
                                  "peak_rss_mib": rss, "bytes": os.path.getsize(out)}))

main()
