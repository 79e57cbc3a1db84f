// Decode speed of llama.cpp itself (node-llama-cpp's prebuilt CPU binary) for bench/decode_bench.sh:
// `node decode_bench.mjs MODEL.gguf THREADS` prints one JSON line with the tokens/s of a
// 32-token prompt followed by 128 greedy tokens, the shape `afinar bench infer` measures
// (new_tokens_per_s: the 128 tokens over the whole time, prompt included; decode_tokens_per_s:
// after the first new token).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, threadsArg] = process.argv.slice(2);
const threads = Number(threadsArg || 2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, threads, sequences: 1});
const sequence = context.getSequence();
let prompt = model.tokenize("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz " +
    "combined movable metal type, oil-based ink and a wooden press adapted from those used for wine.");
prompt = prompt.slice(0, 32);
if (prompt.length < 32) throw new Error(`prompt has only ${prompt.length} tokens`);
const runs = [];
for (let run = 0; run < 4; run++) {
    const t0 = performance.now();
    let first = null;
    let n = 0;
    for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
        n++;
        if (n === 1) first = performance.now();
        if (n >= 128) break;
    }
    const t1 = performance.now();
    await sequence.clearHistory();
    if (run > 0) runs.push({all: 128 / ((t1 - t0) / 1000), decode: 127 / ((t1 - first) / 1000)});
}
const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(JSON.stringify({
    engine: "llama.cpp (node-llama-cpp 3.22.1)", model: modelPath, threads,
    new_tokens_per_s: median(runs.map((r) => r.all)),
    decode_tokens_per_s: median(runs.map((r) => r.decode)),
}));
await llama.dispose();
