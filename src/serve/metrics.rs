//! `GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4), the
//! convention every serving stack follows (vLLM, llama.cpp's server, TGI), so an existing
//! Prometheus or Grafana setup scrapes afinar unchanged.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counts, gauges and histograms updated by the scheduler and the handlers.
pub struct Metrics {
    /// Requests admitted to the scheduler.
    pub requests: AtomicU64,
    /// Requests that ended, by how: stop (end token or stop string), length, cancelled (the
    /// client left), error.
    pub finished: [AtomicU64; 4],
    /// Prompt tokens computed (not taken from a cached prefix).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from a cached prefix.
    pub prefix_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Requests waiting for a slot.
    pub queued: AtomicU64,
    /// Requests in the batch (prefilling or decoding).
    pub running: AtomicU64,
    hist: Mutex<Hists>,
}

/// How a request ended, for [`Metrics::finished`].
#[derive(Clone, Copy)]
pub enum Ending {
    Stop = 0,
    Length = 1,
    Cancelled = 2,
    Error = 3,
}

const ENDINGS: [&str; 4] = ["stop", "length", "cancelled", "error"];

struct Hists {
    batch: Histogram,
    ttft: Histogram,
    itl: Histogram,
}

/// A Prometheus histogram: counts per upper bound (cumulative when rendered), sum and count.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
const TTFT_BOUNDS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            finished: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            prefix_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            hist: Mutex::new(Hists {
                batch: Histogram::new(BATCH_BOUNDS),
                ttft: Histogram::new(TTFT_BOUNDS),
                itl: Histogram::new(ITL_BOUNDS),
            }),
        }
    }
}

impl Metrics {
    fn hists(&self) -> std::sync::MutexGuard<'_, Hists> {
        // A panic while holding the lock leaves plain numbers behind: still usable.
        self.hist.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sequences decoded together in one step.
    pub fn observe_batch(&self, rows: usize) {
        self.hists().batch.observe(rows as f64);
    }

    /// Seconds from a request's arrival to its first token.
    pub fn observe_ttft(&self, secs: f64) {
        self.hists().ttft.observe(secs);
    }

    /// Seconds between two tokens of one request.
    pub fn observe_itl(&self, secs: f64) {
        self.hists().itl.observe(secs);
    }

    pub fn ended(&self, how: Ending) {
        self.finished[how as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The text `GET /metrics` answers with.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "afinar_requests_total",
            "counter",
            "Generation requests admitted.",
            get(&self.requests),
        );
        one(
            "afinar_prompt_tokens_total",
            "counter",
            "Prompt tokens computed.",
            get(&self.prompt_tokens),
        );
        one(
            "afinar_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a cached prefix (hit rate: cached / (cached + computed)).",
            get(&self.prefix_tokens),
        );
        one(
            "afinar_completion_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.completion_tokens),
        );
        one(
            "afinar_requests_queued",
            "gauge",
            "Requests waiting for a slot in the batch.",
            get(&self.queued),
        );
        one(
            "afinar_requests_running",
            "gauge",
            "Requests in the batch.",
            get(&self.running),
        );
        let name = "afinar_requests_finished_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests ended, by how.\n# TYPE {name} counter"
        );
        for (how, n) in ENDINGS.iter().zip(&self.finished) {
            let _ = writeln!(out, "{name}{{reason=\"{how}\"}} {}", get(n));
        }
        let h = self.hists();
        h.batch.render(
            &mut out,
            "afinar_batch_size",
            "Sequences decoded together per step.",
        );
        h.ttft.render(
            &mut out,
            "afinar_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
        );
        h.itl.render(
            &mut out,
            "afinar_inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_and_counters() {
        let m = Metrics::default();
        m.requests.fetch_add(3, Ordering::Relaxed);
        m.ended(Ending::Length);
        for b in [1, 3, 3, 100] {
            m.observe_batch(b);
        }
        let text = m.render();
        assert!(text.contains("afinar_requests_total 3\n"), "{text}");
        assert!(text.contains("afinar_requests_finished_total{reason=\"length\"} 1\n"));
        assert!(text.contains("afinar_batch_size_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("afinar_batch_size_bucket{le=\"2\"} 1\n"));
        assert!(text.contains("afinar_batch_size_bucket{le=\"4\"} 3\n"));
        assert!(text.contains("afinar_batch_size_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("afinar_batch_size_sum 107\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
