// llama.cpp serving many clients, for bench/serve_bench.sh: `node serve.mjs MODEL.gguf PORT
// SLOTS THREADS` answers POST /v1/chat/completions (streamed, greedy, with a final usage chunk:
// what bench/serve_load.py sends) from one context of SLOTS sequences. node-llama-cpp's batching
// puts every active sequence's next token into one llama_decode per step, as llama.cpp's own
// server does with its slots; a request waits for a free sequence when all are busy. The chat
// template is the GGUF's own (tokenizer.chat_template).
import http from "node:http";
import {getLlama, JinjaTemplateChatWrapper, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, portArg, slotsArg, threadsArg] = process.argv.slice(2);
const slots = Number(slotsArg || 8);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const template = model.fileInfo.metadata?.tokenizer?.chat_template;
const wrapper = new JinjaTemplateChatWrapper({template, tokenizer: model.tokenizer});
const context = await model.createContext({
    contextSize: 512 * slots, sequences: slots, threads: Number(threadsArg || 2),
});
const free = Array.from({length: slots}, () => context.getSequence());
const waiting = [];
const take = () => free.length ? Promise.resolve(free.pop()) : new Promise((r) => waiting.push(r));
const give = (s) => waiting.length ? waiting.shift()(s) : free.push(s);

async function answer(req, res) {
    let body = "";
    for await (const c of req) body += c;
    const ask = JSON.parse(body);
    const chatHistory = ask.messages.map((m) => m.role === "assistant"
        ? {type: "model", response: [m.content]} : {type: m.role, text: m.content});
    chatHistory.push({type: "model", response: []});
    let prompt = wrapper.generateContextState({chatHistory}).contextText.tokenize(model.tokenizer);
    if (model.tokens.shouldPrependBosToken && model.tokens.bos != null && prompt[0] !== model.tokens.bos)
        prompt = [model.tokens.bos, ...prompt];
    const seq = await take();
    res.writeHead(200, {"Content-Type": "text/event-stream"});
    const send = (v) => res.write(`data: ${JSON.stringify(v)}\n\n`);
    let n = 0;
    try {
        const ids = [];
        for await (const token of seq.evaluate(prompt, {temperature: 0})) {
            if (model.isEogToken(token)) break;
            ids.push(token);
            n++;
            send({choices: [{index: 0, delta: {content: model.detokenize([token])}}]});
            if (n >= (ask.max_tokens || 32)) break;
        }
    } finally {
        await seq.clearHistory();
        give(seq);
    }
    send({choices: [{index: 0, delta: {}, finish_reason: "stop"}]});
    send({choices: [], usage: {prompt_tokens: prompt.length, completion_tokens: n}});
    res.end("data: [DONE]\n\n");
}

http.createServer((req, res) => answer(req, res).catch((e) => {
    res.writeHead(500);
    res.end(String(e));
})).listen(Number(portArg), "127.0.0.1", () => console.error(`llama.cpp serving on ${portArg}`));
