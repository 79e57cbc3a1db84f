#!/usr/bin/env python3
"""The Python route to a quantized GGUF, timed: every tensor of a Hugging Face safetensors model
quantized with the `gguf` package's `quants.quantize` (numpy) and written with its `GGUFWriter`
— the tensor path of llama.cpp's convert_hf_to_gguf.py (no tokenizer metadata: that part costs
little). `export_peer.py MODEL_DIR OUT.gguf q8_0|q4_0`; prints `RESULT {json}` last."""
import json, resource, sys, time

import numpy as np
import gguf
from safetensors import safe_open

def main():
    src, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(out, "qwen2")
    import glob, os
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    n = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                x = st.get_tensor(name).float().numpy()
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
                                  "dtype": dtype, "parameters": n, "seconds": secs,
                                  "peak_rss_mib": rss, "bytes": os.path.getsize(out)}))

main()
