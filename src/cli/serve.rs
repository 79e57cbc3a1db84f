//! `afinar serve`: the OpenAI-compatible HTTP API and the chat page.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{parse_base_dtype, parse_device, parse_kv, scripts_arg};
use afinar::device::DeviceSpec;
use afinar::model::source::DEFAULT_MODEL;
use afinar::serve::ServeOptions;

#[derive(Args)]
pub struct ServeArgs {
    /// A .gguf file, a Hugging Face model directory, a Hub repo id, or the alias smollm2; served
    /// under this name.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The id clients send as `model` for the base model (default: the alias or Hub id as
    /// given, a .gguf file's stem, a directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// A LoRA adapter served as its own model id: NAME=DIR (repeatable).
    #[arg(long = "adapter", value_parser = parse_kv)]
    pub adapters: Vec<(String, String)>,
    /// Address to bind; 127.0.0.1 keeps the server local (use 0.0.0.0 to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health and the page.
    #[arg(long, env = "AFINAR_API_KEY")]
    pub api_key: Option<String>,
    /// Requests decoded together (continuous batching); later ones wait in arrival order.
    #[arg(long, default_value_t = 8)]
    pub max_concurrent: usize,
    /// Cap (and default) for max_tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Only let the model write letters of these Unicode scripts (e.g. Latin).
    #[arg(long)]
    pub allowed_scripts: Option<String>,
    /// A web page origin allowed to call the API from a browser, e.g. http://localhost:3000
    /// (repeatable; * allows any). Without it no CORS headers are sent.
    #[arg(long = "cors")]
    pub cors: Vec<String>,
    /// Connections open at once; more are answered 503 until some close.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and then its whole body.
    #[arg(long, default_value_t = 30)]
    pub read_timeout: u64,
    /// How the base's weight matrices are held: auto (as the file has them), f32, bf16, q8_0
    /// or q4_0.
    #[arg(long, default_value = "auto", value_parser = parse_base_dtype)]
    pub base_dtype: afinar::model::BaseDtype,
    /// Decode with 8-bit integer dot products on GGUF-quantized weights, as llama.cpp does
    /// (faster; logits move by up to ~1 %). Default: exact f32.
    #[arg(long)]
    pub int8_dot: bool,
}

pub fn run(args: ServeArgs) -> Result<()> {
    afinar::serve::serve(&ServeOptions {
        allowed_scripts: scripts_arg(args.allowed_scripts.as_deref())?,
        model: args.model,
        name: args.name,
        device: args.device,
        base_dtype: args.base_dtype,
        int8_dot: args.int8_dot,
        adapters: args
            .adapters
            .into_iter()
            .map(|(k, v)| (k, PathBuf::from(v)))
            .collect(),
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_concurrent: args.max_concurrent,
        max_tokens: args.max_tokens,
        max_body_bytes: args.max_body_bytes,
        cors: args.cors,
        max_connections: args.max_connections,
        read_timeout: std::time::Duration::from_secs(args.read_timeout.max(1)),
    })?;
    Ok(())
}
