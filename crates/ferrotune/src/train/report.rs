//! What a run shows and leaves behind besides weights: `metrics.jsonl` (one JSON object per
//! step and per evaluation), `loss.png` (train and validation loss against the step), the
//! progress display (a bar on a terminal, plain lines otherwise) and the peak memory.
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.png";

/// (step, loss) points of one curve.
pub type Curve = Vec<(f64, f64)>;

/// Appends to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Open the log of `output_dir`. With `keep_until = Some(step)` (a resumed run) lines of
    /// later steps, written after the checkpoint by the interrupted run, are dropped; with
    /// `None` the log starts empty.
    pub fn open(output_dir: &Path, keep_until: Option<usize>) -> Result<Self> {
        let path = output_dir.join(METRICS_FILE);
        let kept = match keep_until {
            None => String::new(),
            Some(step) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
        };
        write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::file(&self.path, e))
    }

    /// (step, train loss) and (step, val loss) points from the log.
    pub fn curves(&self) -> (Curve, Curve) {
        read_curves(&self.path)
    }
}

pub fn read_curves(path: &Path) -> (Curve, Curve) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut train = Vec::new();
    let mut val = Vec::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let step = v.get("step").and_then(Value::as_f64);
        match (v.get("type").and_then(Value::as_str), step) {
            (Some("train"), Some(s)) => {
                if let Some(x) = v.get("loss").and_then(Value::as_f64) {
                    train.push((s, x));
                }
            }
            (Some("eval"), Some(s)) => {
                if let Some(x) = v.get("val_loss").and_then(Value::as_f64) {
                    val.push((s, x));
                }
            }
            _ => {}
        }
    }
    (train, val)
}

/// Peak resident memory of this process (VmHWM), in bytes; 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// A `kB` field of `/proc/self/status` in bytes (0 where it cannot be read).
pub fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Plot.

const W: u32 = 800;
const H: u32 = 500;
const TRAIN_COLOR: (u8, u8, u8) = (31, 119, 180);
const VAL_COLOR: (u8, u8, u8) = (214, 39, 40);

/// Draw train and validation loss against the step and write `path` as a PNG (atomically).
pub fn plot_loss(path: &Path, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<()> {
    let png = render_loss_png(train, val)?;
    write_atomic(path, &png)
}

/// "Nice" tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi].
pub(crate) fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= target as f64)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut x = first;
    while x <= hi + step * 1e-9 {
        out.push(if x.abs() < step * 1e-9 { 0.0 } else { x });
        x += step;
    }
    out
}

pub(crate) fn fmt_tick(x: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{x:.decimals$}")
}

/// The plot as PNG bytes. Text is drawn with an 8×8 bitmap font: plotters' own text rendering
/// needs a system font (font-kit) or a bundled TTF.
pub fn render_loss_png(train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<Vec<u8>> {
    use plotters::prelude::*;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("drawing the loss plot: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let pts = || train.iter().chain(val.iter());
        let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let xmax = pts().filter(finite).map(|p| p.0).fold(1.0, f64::max);
        let xmin = pts()
            .filter(finite)
            .map(|p| p.0)
            .fold(xmax, f64::min)
            .min(0.0);
        let ymax = pts().filter(finite).map(|p| p.1).fold(f64::MIN, f64::max);
        let ymin = pts().filter(finite).map(|p| p.1).fold(f64::MAX, f64::min);
        let (ymin, ymax) = padded_range(ymin, ymax, 0.05, 1e-3);
        let xt = ticks(xmin, xmax, 8);
        let yt = ticks(ymin, ymax, 6);
        let mut chart = framed_chart(&root, 30, (xmin, xmax), (ymin, ymax), (&xt, &yt), &err)?;
        let (r, g, b) = TRAIN_COLOR;
        let tc = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                train.iter().copied().filter(|p| finite(&p)),
                tc.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        let (r, g, b) = VAL_COLOR;
        let vc = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                val.iter().copied().filter(|p| finite(&p)),
                vc.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                val.iter()
                    .copied()
                    .filter(|p| finite(&p))
                    .map(|p| Circle::new(p, 4, vc.filled())),
            )
            .map_err(|e| err(&e))?;

        let text = |x: i32, y: i32, s: &str, color: RGBColor| -> Result<()> {
            draw_text(&root, x, y, s, color).map_err(|e| err(&e))
        };
        let black = RGBColor(20, 20, 20);
        let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
        for &x in &xt {
            let (px, py) = chart.backend_coord(&(x, ymin));
            let s = fmt_tick(x, xstep);
            text(px - 4 * s.len() as i32, py + 8, &s, black)?;
        }
        let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
        for &y in &yt {
            let (px, py) = chart.backend_coord(&(xmin, y));
            let s = fmt_tick(y, ystep);
            text(px - 8 * s.len() as i32 - 8, py - 4, &s, black)?;
        }
        text(W as i32 / 2 - 16, H as i32 - 20, "step", black)?;
        text(8, 20, "loss", black)?;
        // Legend, top right.
        let lx = W as i32 - 190;
        for (i, (name, c)) in [("train loss", tc), ("val loss", vc)].iter().enumerate() {
            if i == 1 && val.is_empty() {
                continue;
            }
            let y = 14 + 14 * i as i32;
            for dx in 0..24 {
                for dy in 0..2 {
                    root.draw_pixel((lx + dx, y + 3 + dy), c)
                        .map_err(|e| err(&e))?;
                }
            }
            text(lx + 32, y, name, black)?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(encode_png_rgb(&buf, W, H))
}

/// `ymin..ymax` widened by `frac` of its span (at least `min_pad`) on each side, not below 0;
/// `0..1` when there is no value (`ymax < ymin`).
pub(crate) fn padded_range(ymin: f64, ymax: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    if ymax < ymin {
        (0.0, 1.0)
    } else {
        let pad = ((ymax - ymin) * frac).max(min_pad);
        ((ymin - pad).max(0.0), ymax + pad)
    }
}

/// A chart on the f64 ranges `x`, `y` in the plots' common frame: light grid lines at the ticks
/// `xt`, `yt` and dark left and bottom axes; `margin_right` leaves room for labels.
pub(crate) fn framed_chart<'a, 'b>(
    root: &'a plotters::drawing::DrawingArea<
        plotters::prelude::BitMapBackend<'b>,
        plotters::coord::Shift,
    >,
    margin_right: u32,
    (xmin, xmax): (f64, f64),
    (ymin, ymax): (f64, f64),
    (xt, yt): (&[f64], &[f64]),
    err: &dyn Fn(&dyn std::fmt::Display) -> Error,
) -> Result<
    plotters::chart::ChartContext<
        'a,
        plotters::prelude::BitMapBackend<'b>,
        plotters::coord::cartesian::Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::types::RangedCoordf64,
        >,
    >,
> {
    use plotters::prelude::*;
    let mut chart = ChartBuilder::on(root)
        .margin_left(80)
        .margin_bottom(50)
        .margin_top(40)
        .margin_right(margin_right)
        .build_cartesian_2d(xmin..xmax, ymin..ymax)
        .map_err(|e| err(&e))?;
    let grid = RGBColor(225, 225, 225);
    let lines = xt
        .iter()
        .map(|&x| vec![(x, ymin), (x, ymax)])
        .chain(yt.iter().map(|&y| vec![(xmin, y), (xmax, y)]));
    for line in lines {
        chart
            .draw_series(std::iter::once(PathElement::new(line, grid)))
            .map_err(|e| err(&e))?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(xmin, ymax), (xmin, ymin), (xmax, ymin)],
            RGBColor(60, 60, 60),
        )))
        .map_err(|e| err(&e))?;
    Ok(chart)
}

/// Draw `s` at pixel (x, y) with the 8×8 bitmap font (plotters' own text needs a system font).
pub(crate) fn draw_text<DB: plotters::prelude::DrawingBackend>(
    root: &plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    s: &str,
    color: plotters::style::RGBColor,
) -> std::result::Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY
            .get(ch as usize)
            .copied()
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    root.draw_pixel((x + i as i32 * 8 + col, y + row as i32), &color)?;
                }
            }
        }
    }
    Ok(())
}

/// A minimal PNG encoder: 8-bit RGB, no interlace, filter 0 on every row, zlib via flate2.
pub fn encode_png_rgb(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    use flate2::write::ZlibEncoder;
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut c = crc32fast::Hasher::new();
        c.update(kind);
        c.update(data);
        out.extend_from_slice(&c.finalize().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, RGB, deflate, filter 0, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let stride = (w * 3) as usize;
    let mut raw = Vec::with_capacity((stride + 1) * h as usize);
    for row in rgb.chunks(stride) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    let idat = z.finish().expect("writing to a Vec cannot fail");
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

// ---------------------------------------------------------------------------------------------
// Progress.

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else plain lines.
    #[default]
    Auto,
    /// Plain lines every `log_every` steps.
    Lines,
    /// Nothing (tests, library use).
    Quiet,
}

/// The progress bar or log lines of one run.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    log_every: usize,
    total: usize,
    start: std::time::Instant,
    start_step: usize,
}

/// One step's numbers for the display.
pub struct StepLine {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Over all ranks.
    pub tokens_per_s: f64,
    /// Ranks training (1: nothing more is shown).
    pub world_size: usize,
    /// The share of the training time rank 0 spent in collectives.
    pub comm_share: f64,
    /// With overlapped gradient communication: the share the training waited for it.
    pub comm_wait_share: Option<f64>,
}

impl Progress {
    pub fn new(mode: ProgressMode, total: usize, start_step: usize, log_every: usize) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let bar = (mode == ProgressMode::Auto && tty).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_position(start_step as u64);
            b.reset_eta();
            b
        });
        Progress {
            bar,
            lines: mode == ProgressMode::Lines || (mode == ProgressMode::Auto && !tty),
            log_every,
            total,
            start: std::time::Instant::now(),
            start_step,
        }
    }

    /// A message above the bar (or a plain line).
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None if self.lines => eprintln!("{msg}"),
            None => {}
        }
    }

    pub fn step(&self, s: &StepLine) {
        let mut msg = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            s.loss, s.lr, s.tokens_per_s
        );
        if s.world_size > 1 {
            msg.push_str(&format!(
                " | {} ranks, comm {:.0}%",
                s.world_size,
                100.0 * s.comm_share
            ));
            if let Some(w) = s.comm_wait_share {
                msg.push_str(&format!(" ({:.0}% waited)", 100.0 * w));
            }
        }
        if let Some(b) = &self.bar {
            b.set_message(msg);
            b.set_position(s.step as u64);
        } else if self.lines && (s.step.is_multiple_of(self.log_every) || s.step == self.total) {
            let done = (s.step - self.start_step) as f64;
            let el = self.start.elapsed().as_secs_f64();
            let eta = if done > 0.0 {
                el / done * (self.total - s.step) as f64
            } else {
                0.0
            };
            eprintln!(
                "step {}/{} {msg} elapsed {} eta {}",
                s.step,
                self.total,
                hms(el),
                hms(eta)
            );
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The tasks' validation losses for the progress line, after the overall one:
/// ` [sum 1.1000 · qa 1.4000]`; empty without tasks.
pub fn task_losses(by_task: &[(String, super::EvalResult)]) -> String {
    if by_task.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = by_task
        .iter()
        .map(|(name, e)| format!("{name} {:.4}", e.loss))
        .collect();
    format!(" [{}]", parts.join(" · "))
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::ZlibDecoder;
    use std::io::Read;

    /// Split a PNG into (type, data) chunks, checking each CRC.
    fn chunks(png: &[u8]) -> Vec<(String, Vec<u8>)> {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut out = Vec::new();
        let mut i = 8;
        while i < png.len() {
            let n = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let kind = &png[i + 4..i + 8];
            let data = &png[i + 8..i + 8 + n];
            let crc = u32::from_be_bytes(png[i + 8 + n..i + 12 + n].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc);
            out.push((String::from_utf8(kind.to_vec()).unwrap(), data.to_vec()));
            i += 12 + n;
        }
        out
    }

    #[test]
    fn plot_is_a_valid_png_with_both_curves() {
        let train: Vec<(f64, f64)> = (1..=30).map(|s| (s as f64, 3.0 / s as f64 + 0.5)).collect();
        let val = vec![(0.0, 3.4), (10.0, 1.0), (20.0, 0.9), (30.0, 0.85)];
        let png = render_loss_png(&train, &val).unwrap();
        let c = chunks(&png);
        let kinds: Vec<&str> = c.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_eq!(&c[0].1[..8], &[0, 0, 3, 32, 0, 0, 1, 244]); // 800 x 500
        let mut raw = Vec::new();
        ZlibDecoder::new(&c[1].1[..]).read_to_end(&mut raw).unwrap();
        assert_eq!(raw.len(), (1 + 800 * 3) * 500);
        let has = |rgb: (u8, u8, u8)| {
            raw.chunks(800 * 3 + 1)
                .any(|row| row[1..].chunks(3).any(|p| p == [rgb.0, rgb.1, rgb.2]))
        };
        assert!(has(TRAIN_COLOR) && has(VAL_COLOR) && has((20, 20, 20)));
        // Nothing to draw is still a valid (empty) plot, as are NaN points.
        render_loss_png(&[], &[]).unwrap();
        render_loss_png(&[(1.0, f64::NAN)], &[]).unwrap();
    }

    #[test]
    fn task_losses_are_one_compact_bracket() {
        let e = |loss: f64| super::super::EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens: 3,
            accuracy: None,
        };
        assert_eq!(task_losses(&[]), "");
        assert_eq!(
            task_losses(&[("sum".into(), e(1.1)), ("qa".into(), e(f64::NAN))]),
            " [sum 1.1000 · qa NaN]"
        );
    }

    #[test]
    fn nice_ticks() {
        assert_eq!(
            ticks(0.0, 30.0, 8),
            vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
        );
        let t = ticks(0.83, 3.57, 6);
        assert_eq!(t, vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
        assert_eq!(fmt_tick(2.5, 0.5), "2.5");
        assert_eq!(fmt_tick(20.0, 5.0), "20");
    }

    #[test]
    fn metrics_log_drops_lines_past_the_resumed_step() {
        let d = std::env::temp_dir().join(format!("ferrotune-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut log = MetricsLog::open(&d, None).unwrap();
        for s in 1..=5 {
            log.write(&serde_json::json!({"type": "train", "step": s, "loss": s as f64}))
                .unwrap();
        }
        log.write(&serde_json::json!({"type": "eval", "step": 4, "val_loss": 0.5}))
            .unwrap();
        drop(log);
        let log = MetricsLog::open(&d, Some(3)).unwrap();
        let (t, v) = log.curves();
        assert_eq!(t, vec![(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]);
        assert!(v.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
