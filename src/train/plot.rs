//! `loss.png`: the run's curves drawn with `plotters` — training loss (blue line), validation
//! loss (red points), learning rate (green, on the right-hand axis) — with labelled axes, ticks
//! and a legend. Plotters draws into an RGB buffer (its bitmap backend without the `image`
//! crate); the PNG is encoded here with flate2, which the build already has. The same drawing
//! goes to SVG for the HTML evaluation report ([`loss_curve_svg`]), so both show the same.
//!
//! Text needs a font. Rather than embed one (DejaVu Sans is ~750 KB), the first plot reads a
//! system TrueType font (DejaVu Sans or Liberation Sans on Linux, Arial on macOS and Windows);
//! where none is found the plot is drawn without text — axes, ticks and curves only.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::Metrics;
use crate::{Error, Result};

const W: u32 = 800;
const H: u32 = 480;

const TRAIN: RGBColor = RGBColor(40, 90, 200);
const VAL: RGBColor = RGBColor(210, 50, 40);
const LR: RGBColor = RGBColor(40, 150, 70);

/// Font files tried in order; the first that parses is registered as plotters' sans-serif.
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Whether a font is registered with plotters (looked up once per process; plotters keeps its
/// fonts in its own registry, which wants `'static` bytes, hence the one leaked copy).
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_FILES.iter().any(|path| {
            let Ok(bytes) = std::fs::read(path) else {
                return false;
            };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws `history` to `path` (written atomically). Nothing is written for an empty history.
pub fn loss_curve(path: &Path, history: &[Metrics]) -> Result<()> {
    let Some(rgb) = render(history, font_available())? else {
        return Ok(());
    };
    crate::fs::write_atomic(path, &encode_png(&rgb, W as usize, H as usize))
}

/// The same plot as an SVG document, or `None` when there is nothing finite to draw. The
/// browser draws the text, but plotters measures it (legend box, label areas) with the same
/// font as the PNG, so without a system font the SVG is text-free too.
pub fn loss_curve_svg(history: &[Metrics]) -> Option<String> {
    let ranges = ranges(history)?;
    let mut svg = String::new();
    let text = font_available();
    draw(
        SVGBackend::with_string(&mut svg, (W, H)),
        history,
        ranges,
        text,
    )
    .ok()?;
    Some(svg)
}

/// A range around `lo..hi` with a little room, never empty.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.01).max(1e-6);
    (lo - pad)..(hi + pad)
}

/// The plot as W×H RGB bytes, `None` when there is nothing finite to draw.
fn render(history: &[Metrics], text: bool) -> Result<Option<Vec<u8>>> {
    let Some(ranges) = ranges(history) else {
        return Ok(None);
    };
    let mut buf = vec![255u8; (W * H * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut buf, (W, H)),
        history,
        ranges,
        text,
    )
    .map_err(|e| Error::Training(format!("drawing loss.png: {e}")))?;
    Ok(Some(buf))
}

/// (lowest loss, highest loss, last step, highest lr), `None` without a finite loss.
fn ranges(history: &[Metrics]) -> Option<(f64, f64, f64, f64)> {
    let finite = |v: &f64| v.is_finite();
    let losses = history
        .iter()
        .flat_map(|m| std::iter::once(m.loss).chain(m.val_loss))
        .filter(finite);
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return None;
    }
    let max_step = history.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    let lr_max = history
        .iter()
        .map(|m| m.lr)
        .filter(finite)
        .fold(0f64, f64::max)
        .max(1e-12);
    Some((lo, hi, max_step, lr_max))
}

/// Draws the chart on any plotters backend; `text: false` leaves out every label (for a
/// machine without a font).
fn draw<DB: DrawingBackend>(
    backend: DB,
    history: &[Metrics],
    (lo, hi, max_step, lr_max): (f64, f64, f64, f64),
    text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .right_y_label_area_size(78);
    if text {
        builder.caption("loss", ("sans-serif", 20));
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, padded(lo, hi))?
        .set_secondary_coord(0f64..max_step, 0f64..lr_max * 1.05);
    let label_font = ("sans-serif", 14);
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215));
    if text {
        mesh.x_desc("step")
            .y_desc("loss (per target token)")
            .label_style(label_font)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.3}"));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    let mut axes = chart.configure_secondary_axes();
    if text {
        axes.y_desc("learning rate")
            .label_style(label_font)
            .y_label_formatter(&|v| format!("{v:.1e}"));
    } else {
        axes.y_labels(0);
    }
    axes.draw()?;

    let lr_points = history.iter().map(|m| (m.step as f64, m.lr));
    chart
        .draw_secondary_series(LineSeries::new(lr_points, LR.stroke_width(1)))?
        .label("learning rate (right)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LR));
    let train = history
        .iter()
        .filter(|m| m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss));
    chart
        .draw_series(LineSeries::new(train, TRAIN.stroke_width(2)))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN.stroke_width(2)));
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| {
            m.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (m.step as f64, v))
        })
        .collect();
    chart
        .draw_series(LineSeries::new(val.clone(), VAL.stroke_width(1)))?
        .label("validation loss")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, VAL.filled()));
    chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, VAL.filled())))?;
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(label_font)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// An 8-bit RGB PNG of `rgb` (w×h, row-major): signature, IHDR, one zlib IDAT, IEND.
fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for row in rgb.chunks(3 * w) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<Metrics> {
        (1..=40)
            .map(|s| Metrics {
                step: s,
                loss: 3.0 / (1.0 + s as f64 * 0.1) + 0.05 * ((s * 7 % 5) as f64),
                val_loss: (s % 10 == 0).then(|| 2.6 / (1.0 + s as f64 * 0.08)),
                lr: 1e-3 * (s as f64 / 5.0).min(1.0),
                grad_norm: 1.0,
                tokens_per_sec: 100.0,
                elapsed_s: s as f64,
            })
            .collect()
    }

    /// Pixels of exactly `c`.
    fn count(rgb: &[u8], c: RGBColor) -> usize {
        rgb.chunks(3).filter(|p| *p == [c.0, c.1, c.2]).count()
    }

    #[test]
    fn draws_all_three_curves_with_and_without_text() {
        for text in [false, true] {
            if text && !font_available() {
                continue; // no system font here: the text-free plot is what users get
            }
            let rgb = render(&history(), text).unwrap().unwrap();
            for (name, c) in [("train", TRAIN), ("validation", VAL), ("lr", LR)] {
                assert!(count(&rgb, c) > 50, "{name} curve drawn (text: {text})");
            }
            // Text is anti-aliased dark grey-to-black: a plot with labels has many more dark
            // pixels than one without.
            let dark = rgb.chunks(3).filter(|p| p.iter().all(|&v| v < 100)).count();
            assert_eq!(dark > 2000, text, "{dark} dark pixels (text: {text})");
        }
        assert!(render(&[], true).unwrap().is_none());
    }

    #[test]
    fn the_svg_has_axes_numbers_and_all_three_series() {
        if !font_available() {
            return; // no system font here: the text-free SVG is what users get
        }
        let svg = loss_curve_svg(&history()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
            .map(|(inner, _)| inner.trim())
            .collect();
        for label in [
            "step",
            "learning rate",
            "train loss",
            "validation loss",
            "40",
            "1.0e-3",
        ] {
            assert!(
                texts.contains(&label),
                "{label} in the SVG's texts {texts:?}"
            );
        }
        assert!(loss_curve_svg(&[]).is_none());
    }

    #[test]
    fn the_png_is_well_formed() {
        let png = encode_png(&[255; 2 * 3 * 3], 2, 3);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(&png[16..24], &[0, 0, 0, 2, 0, 0, 0, 3]);
        assert!(png.ends_with(&[0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82]));
    }
}
