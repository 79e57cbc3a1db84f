// Tokenization with llama.cpp itself (node-llama-cpp's prebuilt CPU binary, vocabulary only),
// for tests/families.rs: `node tokenize.mjs MODEL.gguf JOB.json` where JOB is ["text", ...];
// prints {"ids": [[ids], ...]}, each with the BOS the model's metadata asks for.
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const texts = JSON.parse(readFileSync(process.argv[3], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: process.argv[2], vocabOnly: true});
const ids = texts.map((t) => {
    // Special-token text is matched whole, as afinar and transformers do.
    let toks = Array.from(model.tokenize(t, true));
    if (model.tokens.shouldPrependBosToken && model.tokens.bos != null) toks = [model.tokens.bos, ...toks];
    return toks;
});
console.log(JSON.stringify({ids}));
await llama.dispose();
