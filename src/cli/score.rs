//! `afinar score`: per-token log-probabilities and perplexity of a text.

use anyhow::Result;
use clap::Args;

use super::args::ModelArg;

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The text to score.
    #[arg(long, short)]
    pub prompt: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let model = args.model.load()?;
    let s = afinar::infer::score(&model, &args.prompt)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{} tokens, perplexity {:.3}", s.ids.len(), s.perplexity);
    }
    Ok(())
}
