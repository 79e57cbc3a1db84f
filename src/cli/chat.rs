//! `afinar chat`: a conversation in the terminal (/reset starts over, /exit quits).

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;

use super::args::{ModelArg, SamplingArgs};
use afinar::infer::generate;
use afinar::model::Message;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// System message for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    if model.chat_template.is_none() {
        anyhow::bail!(
            "{}: the model has no chat template; use `afinar generate` with a plain prompt",
            args.model.model
        );
    }
    let opts = args.sampling.options(&model)?;
    let base: Vec<Message> = args
        .system
        .map(|s| vec![Message::new("system", s)])
        .unwrap_or_default();
    let mut history = base.clone();
    eprintln!(
        "Chatting with {} — /reset starts over, /exit quits.",
        model.source.path().display()
    );
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = base.clone();
                println!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = model.encode_chat(&history, true)?;
        let g = generate(&model, &prompt, &opts, |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
        history.push(Message::new("assistant", g.text.trim().to_string()));
    }
    Ok(())
}
