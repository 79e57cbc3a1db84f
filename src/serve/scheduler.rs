//! Continuous batching: one thread owns the models and, step after step, decodes one token for
//! every running request in a single pass over the weights (`model::decode`), the base model's
//! requests and every adapter's in the same batch. The same pass carries up to
//! [`PREFILL_CHUNK`] tokens of new requests' prompts, so a long prompt delays the others by a
//! chunk per step, not by its whole prefill. New requests join at the next step; finished ones, and those whose client went away,
//! leave it. Requests beyond `--max-concurrent` wait in arrival order. A prompt that starts like
//! a recent one (the same system message and template header) reuses its keys and values.
//!
//! Each request keeps its own KV cache, position, sampler (seeded from its `seed`) and stop
//! strings, and every row of a step is computed as it would be alone, so a request's output does
//! not depend on what else is running.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::Usage;
use super::metrics::{Ending, Metrics};
use crate::infer::constrain::{Constraint, Grammars};
use crate::infer::sampling::{top_indices, Sampler};
use crate::infer::scripts::{token_bytes, token_name};
use crate::infer::{FinishReason, GenerateOptions};
use crate::model::decode::{forward_rows, Row};
use crate::model::ops::softmax::log_sum_exp;
use crate::model::tokenizer::TokenStream;
use crate::model::transformer::Cache;
use crate::model::Model;
use crate::Result;

/// Most prompt tokens fed in one pass (beside every decoding request's one token): a long
/// prompt delays the others' next token by one such chunk at a time.
pub const PREFILL_CHUNK: usize = 128;

/// Recent prompts whose KV caches are kept for prefix reuse.
const PREFIXES: usize = 8;

/// One servable model id: the base model, or a clone of it carrying an adapter.
pub struct Served {
    pub id: String,
    pub model: Model,
    /// The JSON grammar compiler for its tokenizer, built on the first request that needs it.
    pub grammars: std::sync::OnceLock<std::result::Result<Arc<Grammars>, String>>,
    /// Every token's bytes (special tokens: their names), for log-probability entries.
    pub token_table: std::sync::OnceLock<Arc<Vec<Vec<u8>>>>,
}

impl Served {
    pub fn new(id: String, model: Model) -> Self {
        Self {
            id,
            model,
            grammars: Default::default(),
            token_table: Default::default(),
        }
    }

    /// The token table (built once).
    pub fn token_table(&self) -> Arc<Vec<Vec<u8>>> {
        self.token_table
            .get_or_init(|| {
                let tok = &self.model.tokenizer;
                let table = token_bytes(tok)
                    .into_iter()
                    .enumerate()
                    .map(|(id, b)| b.unwrap_or_else(|| token_name(tok, id as u32).into_bytes()))
                    .collect();
                Arc::new(table)
            })
            .clone()
    }

    /// The grammar compiler (built once; an error is kept and repeated).
    pub fn grammars(&self) -> std::result::Result<Arc<Grammars>, String> {
        self.grammars
            .get_or_init(|| {
                let vocab = self.model.config().vocab_size;
                Grammars::new(&self.model.tokenizer, vocab)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// What a request's generation sends back to its handler.
pub enum Piece {
    /// Text, and the log-probabilities of the tokens that made it (when asked for).
    Text(String, Vec<TokenLogprob>),
    Done(FinishReason, Usage),
    Failed(String),
}

/// A generated token's log-probability under the model (its raw logits: before penalties,
/// temperature and constraints), with the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A request for the scheduler.
pub struct Job {
    /// Index into the served models.
    pub model: usize,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// Stop strings (OpenAI's `stop`).
    pub stops: Vec<String>,
    /// Where the pieces go, tagged with `index`: the choice of a request with `n` > 1 (all
    /// its choices share one channel).
    pub tx: UnboundedSender<(usize, Piece)>,
    pub index: usize,
    pub arrived: Instant,
    /// Structured output: the grammar the answer must follow.
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability and this many alternatives (`logprobs`).
    pub logprobs: Option<usize>,
    /// OpenAI's `presence_penalty` and `frequency_penalty`, over the generated tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, bias) added at every step, ids within the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
}

/// Starts the scheduler thread for `models`, at most `max_batch` requests running at once; it
/// ends when the returned sender (and every clone) is dropped.
pub fn spawn(
    models: Arc<Vec<Served>>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("afinar-scheduler".into())
        .spawn(move || run(&models, rx, max_batch.max(1), &metrics))?;
    Ok(tx)
}

fn run(models: &[Served], rx: Receiver<Job>, max_batch: usize, metrics: &Metrics) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut prefixes = PrefixCache::new(PREFIXES);
    loop {
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        waiting.extend(rx.try_iter());
        waiting.retain(|j| {
            let gone = j.tx.is_closed();
            if gone {
                metrics.ended(Ending::Cancelled);
            }
            !gone
        });
        while running.len() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            running.push(Seq::new(job, models, metrics));
        }
        for s in running
            .iter_mut()
            .filter(|s| !s.done && s.job.tx.is_closed())
        {
            s.cancel(metrics);
        }
        running.retain(|s| !s.done);
        metrics
            .queued
            .store(waiting.len() as u64, Ordering::Relaxed);
        metrics
            .running
            .store(running.len() as u64, Ordering::Relaxed);
        if let Err(e) = step(&models[0].model, &mut running, &mut prefixes, metrics) {
            // A failed pass fails every request in it: their caches are no longer consistent.
            for s in running.iter_mut() {
                s.fail(&e.to_string(), metrics);
            }
        }
        running.retain(|s| !s.done);
    }
}

/// One pass: every request with a chosen token feeds it, and the oldest requests still
/// reading their prompts feed up to [`PREFILL_CHUNK`] prompt tokens, all in one pass over the
/// weights; each request whose input is complete chooses its next token.
fn step(
    base: &Model,
    running: &mut [Seq],
    prefixes: &mut PrefixCache,
    metrics: &Metrics,
) -> Result<()> {
    take_prefixes(running, prefixes, metrics);
    let mut who = Vec::new();
    let mut rows = Vec::new();
    let mut budget = PREFILL_CHUNK;
    let mut decoding = 0;
    for (i, s) in running.iter_mut().enumerate() {
        let Seq {
            job,
            cache,
            fed,
            next,
            done,
            model,
            prefix,
            ..
        } = s;
        if *done || *prefix == PrefixState::Waiting {
            continue;
        }
        if let Some(token) = next {
            decoding += 1;
            who.push((i, 0));
            rows.push(Row {
                model: &model.transformer,
                tokens: std::slice::from_ref(token),
                cache,
                logits: true,
            });
        } else if *fed < job.prompt.len() && budget > 0 {
            let end = (*fed + budget).min(job.prompt.len());
            budget -= end - *fed;
            who.push((i, end - *fed));
            rows.push(Row {
                model: &model.transformer,
                tokens: &job.prompt[*fed..end],
                cache,
                logits: end == job.prompt.len(),
            });
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    if decoding > 0 {
        metrics.observe_batch(decoding);
    }
    let logits = forward_rows(&base.transformer, &mut rows)?;
    drop(rows);
    for ((i, prefilled), l) in who.into_iter().zip(logits) {
        let s = &mut running[i];
        if prefilled > 0 {
            s.fed += prefilled;
            metrics
                .prompt_tokens
                .fetch_add(prefilled as u64, Ordering::Relaxed);
            if s.fed == s.job.prompt.len() {
                prefixes.store(s.job.model, s.model, &s.job.prompt, &s.cache);
            }
        }
        s.next = None;
        if let Some(mut l) = l {
            s.choose(&mut l, metrics);
        }
    }
    Ok(())
}

/// Before a request's prompt is first fed: copies the longest cached prefix of it, unless an
/// earlier request sharing its beginning is still reading its prompt (the `n` answers of one
/// request, or clients sending the same system message at once): then it waits a step for that
/// prefix to be cached rather than computing it a second time.
fn take_prefixes(running: &mut [Seq], prefixes: &mut PrefixCache, metrics: &Metrics) {
    for i in 0..running.len() {
        let (before, rest) = running.split_at_mut(i);
        let s = &mut rest[0];
        if s.done || s.fed > 0 || s.prefix == PrefixState::Taken {
            continue;
        }
        let shares = before.iter().any(|o| {
            !o.done
                && o.job.model == s.job.model
                && o.fed < o.job.prompt.len()
                && common_prefix(&o.job.prompt, &s.job.prompt) >= MIN_PREFIX
        });
        if shares {
            s.prefix = PrefixState::Waiting;
            continue;
        }
        s.prefix = PrefixState::Taken;
        match prefixes.fill(s.job.model, &s.job.prompt, &mut s.cache) {
            Ok(n) => {
                s.fed = n;
                metrics.prefix_tokens.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => s.fail(&e.to_string(), metrics),
        }
    }
}

/// Tokens two prompts share from their start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether a request has looked for its prompt's prefix in the cache.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PrefixState {
    NotYet,
    /// An earlier request is computing the same beginning.
    Waiting,
    Taken,
}

/// The KV caches of recent prompts, so that a new prompt starting with the same tokens (a
/// system message and the chat template's header, sent by every client) skips computing them:
/// the longest common prefix with any stored prompt of the same model is copied in.
/// Computing a token's keys and values alone or within any chunk gives the same values
/// (`model::decode`), so reuse changes nothing in the output.
pub struct PrefixCache {
    /// Most recently used last.
    entries: Vec<Prefix>,
    capacity: usize,
}

struct Prefix {
    model: usize,
    tokens: Vec<u32>,
    /// Holds exactly `tokens` (a copy: nothing else writes to it).
    cache: Cache,
}

/// Shortest shared prefix worth copying.
const MIN_PREFIX: usize = 4;
/// Longest prompt stored.
const MAX_PREFIX: usize = 2048;

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
        }
    }

    /// Fills `cache` with the longest stored prefix of `prompt` (leaving at least its last
    /// token to compute); returns the tokens reused.
    fn fill(&mut self, model: usize, prompt: &[u32], cache: &mut Cache) -> Result<usize> {
        let common =
            |e: &Prefix| common_prefix(&e.tokens, prompt).min(prompt.len().saturating_sub(1));
        let Some((best, len)) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model == model)
            .map(|(i, e)| (i, common(e)))
            .max_by_key(|&(_, n)| n)
        else {
            return Ok(0);
        };
        if len < MIN_PREFIX {
            return Ok(0);
        }
        let e = self.entries.remove(best);
        let copied = cache.copy_prefix_from(&e.cache, len);
        self.entries.push(e);
        copied.map(|_| len)
    }

    /// Keeps a copy of `cache`, which holds exactly `prompt`.
    fn store(&mut self, model: usize, model_of: &Model, prompt: &[u32], cache: &Cache) {
        if self.capacity == 0 || prompt.len() > MAX_PREFIX {
            return;
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.model == model && e.tokens == prompt)
        {
            let e = self.entries.remove(i);
            self.entries.push(e);
            return;
        }
        let mut copy = Cache::new(&model_of.transformer);
        if copy.copy_prefix_from(cache, prompt.len()).is_err() {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.remove(0);
        }
        self.entries.push(Prefix {
            model,
            tokens: prompt.to_vec(),
            cache: copy,
        });
    }
}

/// A running request.
struct Seq<'m> {
    job: Job,
    model: &'m Model,
    cache: Cache,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token chosen last and not yet fed.
    next: Option<u32>,
    /// Most tokens to generate (`max_tokens`, within the context).
    budget: usize,
    sampler: Sampler,
    /// Prompt and generated tokens (the repetition penalty's history).
    history: Vec<u32>,
    /// Generated tokens, without the end token.
    tokens: Vec<u32>,
    stream: TokenStream<'m>,
    /// Text the stream has produced so far.
    streamed: String,
    /// Bytes of an unfinished character (the script filter's state).
    pending: Vec<u8>,
    matcher: StopMatcher,
    /// Log-probabilities of tokens whose text has not been sent yet.
    unsent: Vec<TokenLogprob>,
    prefix: PrefixState,
    last_token: Option<Instant>,
    done: bool,
}

impl<'m> Seq<'m> {
    fn new(job: Job, models: &'m [Served], metrics: &Metrics) -> Self {
        let model = &models[job.model].model;
        metrics.requests.fetch_add(1, Ordering::Relaxed);
        let ctx = model.config().max_position_embeddings;
        let budget = job
            .opts
            .max_new_tokens
            .min(ctx.saturating_sub(job.prompt.len()));
        let matcher = StopMatcher::new(job.stops.clone());
        let mut s = Self {
            cache: Cache::new(&model.transformer),
            fed: 0,
            next: None,
            budget,
            sampler: Sampler::new(job.opts.sampling.clone()),
            history: job.prompt.clone(),
            tokens: Vec::new(),
            stream: TokenStream::new(&model.tokenizer),
            streamed: String::new(),
            pending: Vec::new(),
            matcher,
            unsent: Vec::new(),
            prefix: PrefixState::NotYet,
            last_token: None,
            done: false,
            model,
            job,
        };
        if s.job.prompt.is_empty() {
            s.fail("the prompt is empty", metrics);
        } else if s.budget == 0 {
            s.finish(FinishReason::Length, metrics);
        }
        s
    }

    /// Chooses the next token from `logits`, sends the text it completes, and either queues
    /// it for the next step or ends the request.
    fn choose(&mut self, logits: &mut [f32], metrics: &Metrics) {
        let raw = self.job.logprobs.map(|_| logits.to_vec());
        self.penalize(logits);
        if let Some(c) = &mut self.job.constraint {
            if let Err(e) = c.mask(logits) {
                return self.fail(&e.to_string(), metrics);
            }
        }
        let id = match &self.job.opts.scripts {
            Some(f) => {
                let (sampler, history) = (&mut self.sampler, &self.history);
                let id = f.choose(logits, &self.pending, |l| sampler.sample(l, history));
                self.pending = f.pending_after(&self.pending, id);
                id
            }
            None => self.sampler.sample(logits, &self.history),
        };
        let now = Instant::now();
        match self.last_token {
            None => metrics.observe_ttft((now - self.job.arrived).as_secs_f64()),
            Some(t) => metrics.observe_itl((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        if let (Some(raw), Some(top)) = (&raw, self.job.logprobs) {
            self.unsent.push(logprob_of(raw, id, top));
        }
        let end = self.model.tokenizer.end_token_ids.contains(&id);
        if self.job.opts.stop_at_end_token && end {
            return self.finish(FinishReason::Stop, metrics);
        }
        if let Some(c) = &mut self.job.constraint {
            if let Err(e) = c.commit(id) {
                return self.fail(&e.to_string(), metrics);
            }
        }
        self.tokens.push(id);
        self.history.push(id);
        metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
        match self.stream.push(id) {
            Ok(Some(piece)) => {
                self.streamed.push_str(&piece);
                if self.emit(&piece, metrics) {
                    return self.finish(FinishReason::Stop, metrics);
                }
                if self.done {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => return self.fail(&e.to_string(), metrics),
        }
        if self
            .job
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_stopped)
        {
            // The document is complete: nothing else may follow.
            return self.finish(FinishReason::Stop, metrics);
        }
        if self.tokens.len() >= self.budget {
            return self.finish(FinishReason::Length, metrics);
        }
        self.next = Some(id);
    }

    /// OpenAI's `logit_bias`, then its presence and frequency penalties: each token already
    /// generated loses `presence_penalty` once and `frequency_penalty` per occurrence.
    fn penalize(&self, logits: &mut [f32]) {
        for &(t, b) in &self.job.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        let (p, f) = (self.job.presence_penalty, self.job.frequency_penalty);
        if (p == 0.0 && f == 0.0) || self.tokens.is_empty() {
            return;
        }
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in &self.tokens {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p + f * n as f32;
            }
        }
    }

    /// Sends what of `piece` can go out now; true when a stop string was reached. A client
    /// that is gone ends the request.
    fn emit(&mut self, piece: &str, metrics: &Metrics) -> bool {
        let (out, stop) = self.matcher.push(piece);
        if !out.is_empty()
            && self
                .job
                .tx
                .send((
                    self.job.index,
                    Piece::Text(out, std::mem::take(&mut self.unsent)),
                ))
                .is_err()
        {
            self.cancel(metrics);
            return false;
        }
        stop
    }

    /// Ends the request of a client that went away.
    fn cancel(&mut self, metrics: &Metrics) {
        eprintln!(
            "afinar: client went away; generation stopped after {} tokens",
            self.tokens.len()
        );
        self.done = true;
        metrics.ended(Ending::Cancelled);
    }

    /// Sends the rest of the text and the end of the request.
    fn finish(&mut self, reason: FinishReason, metrics: &Metrics) {
        if self.done {
            return;
        }
        let mut hit_stop = self.matcher.stopped;
        if !hit_stop {
            // What the stream held back (an incomplete character at the very end).
            if let Ok(full) = self.model.tokenizer.decode(&self.tokens, true) {
                if let Some(rest) = full.strip_prefix(self.streamed.as_str()) {
                    if !rest.is_empty() {
                        hit_stop = self.emit(rest, metrics);
                    }
                }
            }
            if self.done {
                return;
            }
            let held = std::mem::take(&mut self.matcher.held);
            if !hit_stop && !held.is_empty() {
                let _ = self.job.tx.send((
                    self.job.index,
                    Piece::Text(held, std::mem::take(&mut self.unsent)),
                ));
            }
        }
        if !self.unsent.is_empty() {
            // Tokens without text of their own (the end token, text cut by a stop string).
            let lps = std::mem::take(&mut self.unsent);
            let _ = self
                .job
                .tx
                .send((self.job.index, Piece::Text(String::new(), lps)));
        }
        let reason = if hit_stop { FinishReason::Stop } else { reason };
        let usage = Usage::new(self.job.prompt.len(), self.tokens.len());
        let _ = self
            .job
            .tx
            .send((self.job.index, Piece::Done(reason, usage)));
        metrics.ended(match reason {
            FinishReason::Stop => Ending::Stop,
            FinishReason::Length => Ending::Length,
        });
        self.done = true;
    }

    fn fail(&mut self, message: &str, metrics: &Metrics) {
        if !self.done {
            let _ = self
                .job
                .tx
                .send((self.job.index, Piece::Failed(message.to_string())));
            metrics.ended(Ending::Error);
            self.done = true;
        }
    }
}

/// `token`'s log-probability under `logits`, and the `top` most likely tokens'.
fn logprob_of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let best = top_indices(logits, top);
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top: best
            .into_iter()
            .map(|t| (t, logits[t as usize] - lse))
            .collect(),
    }
}

/// Holds back text that could be the start of a stop sequence, and ends at the first match.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Text that can be sent now, and whether a stop sequence was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            self.stopped = true;
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_sequences_are_held_back_and_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D and more"), (String::new(), true));
        assert_eq!(m.push("after"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("a\n"), ("a".to_string(), false));
        assert_eq!(m.push("b"), ("\nb".to_string(), false));
    }
}
