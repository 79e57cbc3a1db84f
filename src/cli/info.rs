//! `afinar info`: a model's architecture, size, tokenizer and chat template.

use anyhow::Result;
use clap::Args;

use super::args::ModelArg;
use afinar::model::ModelInfo;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let info = args.model.load()?.info();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_info(&info);
    }
    Ok(())
}

fn print_info(i: &ModelInfo) {
    println!("source          {}", i.source);
    println!("architecture    {}", i.architecture);
    println!(
        "parameters      {} ({:.1} M)",
        i.parameters,
        i.parameters as f64 / 1e6
    );
    println!(
        "file dtype      {} (computed in {})",
        i.file_dtype, i.compute_dtype
    );
    println!(
        "held as         {} matrices ({:.0} MB of weights in memory)",
        afinar::model::weights::held_summary(&i.held),
        i.weight_bytes as f64 / 1e6
    );
    println!(
        "vocabulary      {} (tokenizer: {})",
        i.vocab_size, i.tokenizer_vocab_size
    );
    println!("context length  {}", i.context_length);
    println!(
        "layers          {} × hidden {}, {} heads ({} key/value)",
        i.layers, i.hidden_size, i.attention_heads, i.kv_heads
    );
    println!("tied embeddings {}", i.tied_embeddings);
    println!(
        "bos token       {}",
        i.bos_token.as_deref().unwrap_or("(none)")
    );
    println!(
        "eos token       {}",
        i.eos_token.as_deref().unwrap_or("(none)")
    );
    println!("end tokens      {}", i.end_tokens.join(" "));
    println!(
        "chat template   {}",
        if i.chat_template { "yes" } else { "no" }
    );
    let features: Vec<&str> = i.cpu["features"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    println!(
        "cpu             {} ({})",
        i.cpu["model"].as_str().unwrap_or("?"),
        features.join(" ")
    );
    println!(
        "training        base products in {} (compute = \"auto\")",
        i.training_kernel
    );
    for n in &i.notes {
        println!("note            {n}");
    }
    println!(
        "afinar runs     {}",
        afinar::model::config::Architecture::SUPPORTED
    );
}
