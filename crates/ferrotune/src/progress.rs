//! Progress of long library calls: loading a model (tensors), perplexity (tokens), evaluation
//! (rows x models), scoring (rows). The library says how much work there is and how much is
//! done; the caller decides how to show it: [`NoProgress`] (the default of the plain functions)
//! or [`Bar`] (a bar with rate and ETA on stderr, only when stderr is a terminal).
use crate::model::WeightSource;
use crate::nn::{EmbeddingWeight, LinearWeight};
use crate::Result;
use candle_core::{Device, Tensor};
use std::cell::RefCell;

/// Receives the work counts of a long call. One task runs at a time: `start`, `advance`..., `finish`.
pub trait Progress {
    /// A new task of `total` units; `unit` names them ("tensors", "tokens", "rows").
    fn start(&self, task: &str, total: u64, unit: &str);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The task is over (a bar is cleared).
    fn finish(&self);
    /// A line for the user while a task may be running (above the bar when one is shown).
    fn println(&self, line: &str) {
        eprintln!("{line}");
    }
}

/// Shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A progress bar with position, rate and ETA:
/// `perplexity [=====>    ] 512/1142 tokens 210.3 tokens/s [00:00:02 < 00:00:03]`.
pub struct Bar {
    target: Option<Box<dyn Fn() -> indicatif::ProgressDrawTarget>>,
    current: RefCell<Option<indicatif::ProgressBar>>,
}

impl Bar {
    /// A bar on stderr when stderr is a terminal and not `quiet`; otherwise a bar that shows
    /// nothing (piped output and logs stay free of control characters).
    pub fn stderr(quiet: bool) -> Bar {
        use std::io::IsTerminal;
        let shown = !quiet && std::io::stderr().is_terminal();
        Bar {
            target: shown.then(|| {
                Box::new(indicatif::ProgressDrawTarget::stderr)
                    as Box<dyn Fn() -> indicatif::ProgressDrawTarget>
            }),
            current: RefCell::new(None),
        }
    }

    /// A bar drawn wherever `target` says (each task gets a fresh target from it).
    pub fn with_target(target: impl Fn() -> indicatif::ProgressDrawTarget + 'static) -> Bar {
        Bar {
            target: Some(Box::new(target)),
            current: RefCell::new(None),
        }
    }

    /// Whether tasks are drawn at all.
    pub fn is_shown(&self) -> bool {
        self.target.is_some()
    }
}

impl Progress for Bar {
    fn start(&self, task: &str, total: u64, unit: &str) {
        self.finish();
        let Some(target) = &self.target else { return };
        let unit_rate = unit.to_string();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} {bar:30.cyan/blue} {pos}/{len} {msg} {rate} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template")
        .with_key(
            "rate",
            move |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1} {unit_rate}/s", s.per_sec());
            },
        )
        .progress_chars("=> ");
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), target());
        bar.set_message(unit.to_string());
        bar.set_prefix(task.to_string());
        bar.set_style(style);
        bar.tick();
        *self.current.borrow_mut() = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &*self.current.borrow() {
            b.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.current.borrow_mut().take() {
            b.finish_and_clear();
        }
    }

    fn println(&self, line: &str) {
        match &*self.current.borrow() {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A weight source that reports each tensor it hands out (for the loading bar).
pub(crate) struct CountingSource<'a> {
    pub inner: &'a dyn WeightSource,
    pub progress: &'a dyn Progress,
}

impl WeightSource for CountingSource<'_> {
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn source_name(&self) -> String {
        self.inner.source_name()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.tensor_shape(name)
    }
    fn tensor_label(&self, name: &str) -> String {
        self.inner.tensor_label(name)
    }
    fn layers_present(&self) -> usize {
        self.inner.layers_present()
    }
    fn dense(&self, name: &str) -> Result<Tensor> {
        let t = self.inner.dense(name);
        self.progress.advance(1);
        t
    }
    fn linear_weight(&self, name: &str) -> Result<LinearWeight> {
        let w = self.inner.linear_weight(name);
        self.progress.advance(1);
        w
    }
    fn embedding_weight(&self, name: &str) -> Result<EmbeddingWeight> {
        let w = self.inner.embedding_weight(name);
        self.progress.advance(1);
        w
    }
}

/// Records what a call reports, for tests: `("start TASK UNIT", total)`, `("advance", n)`,
/// `("finish", 0)`, `("println LINE", 0)`.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Recorder(pub RefCell<Vec<(String, u64)>>);

#[cfg(test)]
impl Recorder {
    /// The sum of all advances.
    pub fn advanced(&self) -> u64 {
        self.0
            .borrow()
            .iter()
            .filter(|e| e.0 == "advance")
            .map(|e| e.1)
            .sum()
    }
}

#[cfg(test)]
impl Progress for Recorder {
    fn start(&self, task: &str, total: u64, unit: &str) {
        self.0
            .borrow_mut()
            .push((format!("start {task} {unit}"), total));
    }
    fn advance(&self, n: u64) {
        self.0.borrow_mut().push(("advance".into(), n));
    }
    fn finish(&self) {
        self.0.borrow_mut().push(("finish".into(), 0));
    }
    fn println(&self, line: &str) {
        self.0.borrow_mut().push((format!("println {line}"), 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(&format!("{s}\n"));
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bar_shows_position_rate_and_eta() {
        let screen = Screen::default();
        let s = screen.clone();
        let bar = Bar::with_target(move || {
            indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(s.clone()), 250)
        });
        bar.start("perplexity", 200, "tokens");
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.advance(50);
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.advance(50);
        let shown = screen.0.lock().unwrap().clone();
        assert!(shown.contains("perplexity"), "{shown:?}");
        assert!(shown.contains("100/200 tokens"), "{shown:?}");
        assert!(shown.contains(" tokens/s [00:00:00 < 00:00:"), "{shown:?}");
        bar.finish();
    }

    #[test]
    fn a_quiet_bar_draws_nothing() {
        let bar = Bar::stderr(true);
        assert!(!bar.is_shown());
        bar.start("eval", 10, "rows");
        bar.advance(3);
        assert!(bar.current.borrow().is_none());
    }
}
