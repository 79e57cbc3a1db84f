//! The loss curve as a PNG, drawn and encoded here (a few dozen lines) rather than pulling a
//! plotting stack into the binary: training loss in blue, validation loss in red.

use std::io::Write;
use std::path::Path;

use super::Metrics;
use crate::Result;

const W: usize = 640;
const H: usize = 400;
const MARGIN: usize = 40;

struct Canvas(Vec<[u8; 3]>);

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.0[y as usize * W + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for d in 0..2 {
                self.set(x as i64, y as i64 + d, c);
            }
        }
    }
}

/// Draws `history` to `path` (written atomically).
pub fn loss_curve(path: &Path, history: &[Metrics]) -> Result<()> {
    let mut c = Canvas(vec![[255, 255, 255]; W * H]);
    let grey = [160, 160, 160];
    c.line(
        (MARGIN as f64, MARGIN as f64),
        (MARGIN as f64, (H - MARGIN) as f64),
        grey,
    );
    c.line(
        (MARGIN as f64, (H - MARGIN) as f64),
        ((W - MARGIN) as f64, (H - MARGIN) as f64),
        grey,
    );
    let vals = history
        .iter()
        .flat_map(|m| std::iter::once(m.loss).chain(m.val_loss))
        .filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if history.is_empty() || !lo.is_finite() {
        return Ok(());
    }
    let max_step = history.last().map_or(1, |m| m.step).max(1) as f64;
    let span = (hi - lo).max(1e-9);
    let px = |step: usize, v: f64| {
        let x = MARGIN as f64 + (W - 2 * MARGIN) as f64 * step as f64 / max_step;
        let y = (H - MARGIN) as f64 - (H - 2 * MARGIN) as f64 * (v - lo) / span;
        (x, y)
    };
    for w in history.windows(2) {
        c.line(
            px(w[0].step, w[0].loss),
            px(w[1].step, w[1].loss),
            [40, 90, 200],
        );
    }
    let val: Vec<(usize, f64)> = history
        .iter()
        .filter_map(|m| m.val_loss.map(|v| (m.step, v)))
        .collect();
    for w in val.windows(2) {
        c.line(px(w[0].0, w[0].1), px(w[1].0, w[1].1), [210, 50, 40]);
    }
    for &(s, v) in &val {
        let (x, y) = px(s, v);
        for dx in -3..=3 {
            for dy in -3..=3 {
                c.set(x as i64 + dx, y as i64 + dy, [210, 50, 40]);
            }
        }
    }
    let png = encode_png(&c.0);
    crate::fs::write_atomic(path, &png)
}

fn encode_png(pixels: &[[u8; 3]]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(H * (1 + 3 * W));
    for row in pixels.chunks(W) {
        raw.push(0); // filter: none
        for p in row {
            raw.extend_from_slice(p);
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    for (kind, data) in [
        (b"IHDR", ihdr.as_slice()),
        (b"IDAT", idat.as_slice()),
        (b"IEND", &[][..]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    out
}
