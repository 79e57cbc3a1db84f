//! `afinar generate`: one prompt, the answer streamed to stdout (or one JSON object).

use std::io::Write;

use anyhow::Result;
use clap::Args;

use super::args::{ModelArg, SamplingArgs};
use afinar::infer::generate;
use afinar::model::Message;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// System message (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let opts = args.sampling.options(&model)?;
    let prompt = if args.chat || args.system.is_some() {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", args.prompt.clone()));
        model.encode_chat(&messages, true)?
    } else {
        model.tokenizer.encode(&args.prompt, true)?
    };
    let mut out = std::io::stdout().lock();
    let json = args.json;
    let g = generate(&model, &prompt, &opts, |piece| {
        if !json {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        println!();
    }
    Ok(())
}
