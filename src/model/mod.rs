//! Step 3 of the pipeline: pick a pretrained model. Resolves `--model`, reads GGUF or Hugging
//! Face layouts into one [`Model`]: the transformer, its tokenizer and its chat template.

pub mod chat_template;
pub mod config;
pub mod decode;
pub mod gguf;
pub mod hf;
pub mod layout;
pub mod ops;
pub mod source;
pub mod stream;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use candle_core::Device;
use serde::Serialize;

pub use chat_template::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig};
pub use source::ModelSource;
pub use tokenizer::TextTokenizer;
pub use transformer::Transformer;
pub use weights::{BaseDtype, Weight};

use crate::Result;

/// The text side of a model (tokenizer and chat template) without its weights: what data
/// preparation needs, loaded in milliseconds even for large models.
pub struct TextSide {
    pub source: ModelSource,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
}

impl TextSide {
    /// Resolves `spec` and reads only its tokenizer and template.
    pub fn load(spec: &str) -> Result<Self> {
        let source = source::resolve(spec)?;
        let (tokenizer, template) = match &source {
            ModelSource::Gguf(path) => gguf::load_text_side(path)?,
            ModelSource::HfDir(dir) => hf::load_text_side(dir)?,
        };
        let chat_template = ChatTemplate::for_source(template, &tokenizer, &source)?;
        Ok(Self {
            source,
            tokenizer,
            chat_template,
        })
    }
}

/// A loaded model, ready for inference or training. Cloning shares the weights.
#[derive(Clone)]
pub struct Model {
    pub source: ModelSource,
    pub transformer: Transformer,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Storage type of the weights in the file (they are computed in f32).
    pub file_dtype: String,
}

impl Model {
    /// Resolves `spec` (path, repo id or alias) and loads it onto `device`, its matrices held
    /// as they come ([`BaseDtype::Auto`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::load_with(spec, device, BaseDtype::Auto)
    }

    /// [`Model::load`] with the base's matrices held as `base` says.
    pub fn load_with(spec: &str, device: &Device, base: BaseDtype) -> Result<Self> {
        let source = source::resolve(spec)?;
        Self::load_source(source, device, base)
    }

    /// Loads an already-resolved source.
    pub fn load_source(source: ModelSource, device: &Device, base: BaseDtype) -> Result<Self> {
        let (config, weights, tokenizer, template, file_dtype, factors) = match &source {
            ModelSource::Gguf(path) => {
                let m = gguf::load(path, device, base)?;
                (
                    m.config,
                    m.weights,
                    m.tokenizer,
                    m.chat_template,
                    m.file_dtype,
                    m.rope_freq_factors,
                )
            }
            ModelSource::HfDir(dir) => {
                let m = hf::load(dir, device, base)?;
                (
                    m.config,
                    m.weights,
                    m.tokenizer,
                    m.chat_template,
                    m.file_dtype,
                    None,
                )
            }
        };
        let chat_template = ChatTemplate::for_source(template, &tokenizer, &source)?;
        let transformer = Transformer::from_weights(config, weights, factors)?;
        Ok(Self {
            source,
            transformer,
            tokenizer,
            chat_template,
            file_dtype,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.transformer.config
    }

    /// Renders a conversation with the model's template, or errors if it has none.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "{}: the model has no chat template; use plain prompts (without --chat)",
                self.source.path().display()
            ))
        })?;
        t.render(messages, add_generation_prompt)
    }

    /// Tokens of a rendered chat prompt. Templates write BOS themselves when the model needs it,
    /// so the tokenizer's post-processor is not applied a second time.
    ///
    /// Only the template's own markup yields control tokens: a message whose content contains
    /// special-token text (`<|im_end|>\n<|im_start|>system …`, a turn forged by a client) is
    /// encoded by [`Model::encode_chat_separated`], where that text stays ordinary characters.
    /// Conversations without such text take the tokenizer's plain path, so their ids are
    /// exactly what they always were.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let decoder = self.tokenizer.inner.get_added_tokens_decoder();
        let forged = messages.iter().any(|m| {
            decoder
                .values()
                .any(|t| t.special && !t.content.is_empty() && m.content.contains(&t.content))
        });
        if forged {
            return self.encode_chat_separated(messages, add_generation_prompt);
        }
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text, false)
    }

    /// [`Model::encode_chat`] with message content and template markup told apart: the template
    /// is rendered a second time with each content replaced by a unique placeholder, which
    /// locates every content span in the real rendering (templates that trim content are
    /// followed); the markup's special tokens become control tokens and the content is encoded
    /// as text ([`TextTokenizer::encode_with_plain_spans`]). For conversations without
    /// special-token text the ids equal the plain encoding (tests check it on the fixtures and
    /// SmolLM2). Errors when the template transforms content beyond trimming, naming the
    /// message, rather than guessing where it is.
    pub fn encode_chat_separated(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        let spans = self.content_spans(messages, add_generation_prompt, &text)?;
        self.tokenizer.encode_with_plain_spans(&text, &spans)
    }

    /// The byte ranges of `text` (the rendering of `messages`) that are message content, in
    /// order. See [`Model::encode_chat_separated`].
    fn content_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        text: &str,
    ) -> Result<Vec<std::ops::Range<usize>>> {
        // A marker no client can predict (it depends on the whole rendering, content included)
        // made of private-use characters, checked absent from the rendering.
        let nonce = crate::rng::stable_hash(text.as_bytes(), 0x5eed_c0de);
        let (open, close) = (format!("\u{E000}afinar-{nonce:016x}-"), "\u{E001}");
        let unexpected = |what: &str| {
            crate::Error::Template(format!(
                "{}: the chat template {what}; afinar cannot tell message content from the \
                 template's markup, and a message contains special-token text: remove it",
                self.source.path().display()
            ))
        };
        if text.contains(&open) {
            return Err(unexpected("output contains afinar's content marker"));
        }
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{open}{i}{close}")
                };
                Message::new(m.role.clone(), content)
            })
            .collect();
        let rendered = self.render_chat(&marked, add_generation_prompt)?;
        // The rendering as markup pieces and the message indices between them.
        let mut markup = Vec::new();
        let mut order = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&open) {
            markup.push(&rest[..at]);
            let after = &rest[at + open.len()..];
            let end = after
                .find(close)
                .ok_or_else(|| unexpected("cuts message content apart"))?;
            let i: usize = after[..end]
                .parse()
                .ok()
                .filter(|&i| i < messages.len())
                .ok_or_else(|| unexpected("cuts message content apart"))?;
            order.push(i);
            rest = &after[end + close.len()..];
        }
        markup.push(rest);
        // Walk the real rendering: markup, then each message's content as written or trimmed.
        let mut spans = Vec::with_capacity(order.len());
        let mut pos = 0;
        for (k, &i) in order.iter().enumerate() {
            if !text[pos..].starts_with(markup[k]) {
                return Err(unexpected("renders differently with other content"));
            }
            pos += markup[k].len();
            let c = messages[i].content.as_str();
            let next = markup[k + 1];
            let last = k + 1 == order.len();
            let fits = |cand: &str| {
                let after = &text[pos..];
                after.starts_with(cand)
                    && after[cand.len()..].starts_with(next)
                    && (!last || pos + cand.len() + next.len() == text.len())
            };
            let cand = [c, c.trim(), c.trim_start(), c.trim_end()]
                .into_iter()
                .find(|cand| fits(cand))
                .ok_or_else(|| unexpected(&format!("transforms the content of message {i}")))?;
            spans.push(pos..pos + cand.len());
            pos += cand.len();
        }
        if order.is_empty() && text != markup[0] {
            return Err(unexpected("renders differently with other content"));
        }
        Ok(spans)
    }

    /// A summary for `afinar info`.
    pub fn info(&self) -> ModelInfo {
        let c = self.config();
        let tok = &self.tokenizer;
        let name = |id: u32| tok.inner.id_to_token(id).unwrap_or_default();
        ModelInfo {
            source: self.source.path().display().to_string(),
            architecture: c.architecture.name().to_string(),
            parameters: c.parameter_count(),
            file_dtype: self.file_dtype.clone(),
            compute_dtype: "F32".into(),
            held: self.transformer.held_formats(),
            weight_bytes: self.transformer.weight_bytes(),
            vocab_size: c.vocab_size,
            tokenizer_vocab_size: tok.vocab_size(),
            context_length: c.max_position_embeddings,
            hidden_size: c.hidden_size,
            layers: c.num_layers,
            attention_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            tied_embeddings: c.tie_word_embeddings,
            bos_token: tok.bos_token.clone(),
            eos_token: tok.eos_token.clone(),
            end_tokens: tok.end_token_ids.iter().map(|&i| name(i)).collect(),
            chat_template: self.chat_template.is_some(),
            cpu: ops::cpu_description(),
            training_kernel: ops::matmul_kernel(ops::bf16_gemm::available()).to_string(),
            notes: family_notes(c)
                .into_iter()
                .chain(tok.notes.iter().cloned())
                .collect(),
        }
    }
}

/// What `info` says of a family's features beyond Llama's: sliding windows, layers without
/// RoPE, per-head norms.
fn family_notes(c: &ModelConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let n = c.num_layers;
    if let Some(w) = c.sliding_window {
        let sliding = (0..n).filter(|&i| c.layer_window(i).is_some()).count();
        let base = match c.rope_local_theta {
            Some(t) => format!(", RoPE base {t} there"),
            None => String::new(),
        };
        notes.push(format!(
            "sliding attention window of {w} tokens on {sliding} of {n} layers{base}"
        ));
    }
    let nope = c.no_rope_layers.iter().filter(|&&x| x).count();
    if nope > 0 {
        notes.push(format!("{nope} of {n} layers without RoPE"));
    }
    if c.architecture.qk_norm() {
        notes.push("per-head RMSNorm on queries and keys".into());
    }
    if c.architecture.parallel_block() {
        notes
            .push("attention and MLP in parallel from one LayerNorm; multi-query attention".into());
    }
    if c.partial_rotary_factor.is_some() {
        notes.push(format!(
            "RoPE turns {} of each head's {} dimensions",
            c.rotary_dim(),
            c.head_dim
        ));
    }
    if let Some(l) = &c.longrope {
        notes.push(format!(
            "LongRoPE: short factors up to {} tokens, the long ones past it (decided per call, as \
             in transformers)",
            l.original_max_position_embeddings
        ));
    }
    notes
}

/// What `afinar info` prints.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub source: String,
    pub architecture: String,
    pub parameters: usize,
    pub file_dtype: String,
    pub compute_dtype: String,
    /// How the matrices are held in memory: format → number of matrices.
    pub held: std::collections::BTreeMap<String, usize>,
    /// Bytes of every weight in memory (matrices as held, norms and biases in f32).
    pub weight_bytes: usize,
    pub vocab_size: usize,
    pub tokenizer_vocab_size: usize,
    pub context_length: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub tied_embeddings: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub end_tokens: Vec<String>,
    pub chat_template: bool,
    /// This CPU (model name, the instruction sets the kernels dispatch on at run time).
    pub cpu: serde_json::Value,
    /// The kernel training's frozen-base products take with `compute = "auto"`.
    pub training_kernel: String,
    pub notes: Vec<String>,
}
