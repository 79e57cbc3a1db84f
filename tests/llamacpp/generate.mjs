// Greedy generation with llama.cpp itself (node-llama-cpp's prebuilt CPU binary), for
// tests/export_gguf.rs: `node generate.mjs JOB.json` where JOB is
//   {"model": "x.gguf", "lora": "a.gguf" | null, "max_tokens": 32,
//    "chats": [[{"role": "user", "content": "..."}], ...]}
// prints {"results": [{"prompt": [ids], "tokens": [ids], "end": id | null}]}: the chat template
// is the one in the GGUF's metadata (tokenizer.chat_template), rendered by node-llama-cpp's
// Jinja chat wrapper; `end` is the end-of-generation token llama.cpp stopped at (null when it
// ran to max_tokens).
import {readFileSync} from "node:fs";
import {getLlama, JinjaTemplateChatWrapper, LlamaLogLevel} from "node-llama-cpp";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: job.model});
const template = model.fileInfo.metadata?.tokenizer?.chat_template;
if (!template) throw new Error(`${job.model}: no tokenizer.chat_template in the GGUF metadata`);
const wrapper = new JinjaTemplateChatWrapper({template, tokenizer: model.tokenizer});
const context = await model.createContext({
    contextSize: 1024,
    // One thread: llama.cpp's spinning thread barrier crawls on a shared, busy machine.
    threads: 1,
    sequences: 1,
    ...(job.lora ? {lora: {adapters: [{filePath: job.lora, scale: 1}]}} : {}),
});
const sequence = context.getSequence();
const results = [];
for (const chat of job.chats) {
    const chatHistory = chat.map((m) => m.role === "assistant"
        ? {type: "model", response: [m.content]}
        : {type: m.role, text: m.content});
    chatHistory.push({type: "model", response: []});
    const {contextText} = wrapper.generateContextState({chatHistory});
    let prompt = contextText.tokenize(model.tokenizer);
    if (model.tokens.shouldPrependBosToken && model.tokens.bos != null && prompt[0] !== model.tokens.bos)
        prompt = [model.tokens.bos, ...prompt];
    const tokens = [];
    let end = null;
    if (job.max_tokens > 0) {
        for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
            if (model.isEogToken(token)) {
                end = token;
                break;
            }
            tokens.push(token);
            if (tokens.length >= job.max_tokens) break;
        }
    }
    await sequence.clearHistory();
    results.push({prompt, tokens, end});
}
console.log(JSON.stringify({results}));
await llama.dispose();
