// Greedy generation from token ids with llama.cpp itself (node-llama-cpp's prebuilt CPU binary),
// for tests/families.rs: `node greedy_ids.mjs JOB.json` where JOB is
//   {"model": "x.gguf", "max_tokens": 16, "prompts": [[ids], ...]}
// prints {"results": [[ids], ...]}: the tokens llama.cpp picks after each prompt, never stopping
// at an end token (the tiny fixtures' random weights end anywhere).
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: job.model});
const context = await model.createContext({contextSize: 256, threads: 1, sequences: 1});
const sequence = context.getSequence();
const results = [];
for (const prompt of job.prompts) {
    const tokens = [];
    for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
        tokens.push(token);
        if (tokens.length >= job.max_tokens) break;
    }
    await sequence.clearHistory();
    results.push(tokens);
}
console.log(JSON.stringify({results}));
await llama.dispose();
