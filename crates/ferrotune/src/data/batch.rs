//! Batches as tensors: length-grouped with right padding, or packed rows; a resumable cursor.
//!
//! Each epoch has a plan (which examples go in which row of which batch) that is a pure function
//! of the examples, the config and the epoch number, so a [`DataCursor`] `(epoch, index)` saved
//! with a checkpoint is enough to continue a run with exactly the batches it would have seen.
//!
//! Pre-training objectives that draw masks (MLM, span corruption) are applied as each batch is
//! built ([`BatchConfig::masking`]), from the seed, the epoch and the example's index.
use std::borrow::Cow;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::objectives::Masking;
use super::split::permutation;
use super::template::splitmix64;
use super::{Example, Source, IGNORE};
use crate::{Error, Result};

/// How examples are grouped into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest row (packing fills rows up to it; examples are already at most this long).
    pub max_seq_len: usize,
    /// Concatenate examples into rows of up to `max_seq_len` tokens.
    pub packing: bool,
    /// Shuffle each epoch (seeded); `false` keeps the given order (evaluation).
    pub shuffle: bool,
    pub seed: u64,
    /// Without packing: examples are sorted by length within windows of
    /// `group_window * batch_size` consecutive (shuffled) examples, so a batch holds examples of
    /// similar length (little padding) while the order stays random at a larger scale.
    pub group_window: usize,
    /// Id written into padding positions (the tokenizer's pad id, else its eos id).
    pub pad_id: u32,
    /// What the examples' labels are (next-token labels unless set).
    pub targets: Targets,
    /// Masks drawn per batch (MLM, span corruption): the examples are raw token chunks and
    /// become training examples (of the masking's targets) when their batch is built.
    pub masking: Option<Masking>,
}

impl BatchConfig {
    pub fn new(batch_size: usize, max_seq_len: usize, pad_id: u32) -> Self {
        BatchConfig {
            batch_size,
            max_seq_len,
            packing: false,
            shuffle: true,
            seed: 0,
            group_window: 50,
            pad_id,
            targets: Targets::NextToken,
            masking: None,
        }
    }

    /// The same settings for examples whose labels are `targets`.
    pub fn with_targets(self, targets: Targets) -> Self {
        BatchConfig { targets, ..self }
    }
}

/// What the labels of a [`Batch`] (and of the [`Example`]s it is built from) are: one batch
/// type serves every task, and the model reads `labels` by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Targets {
    /// Causal LM: labels `(b, t)` aligned with `input_ids`; the logits at `i - 1` predict
    /// `labels[i]`. An example's labels: one per input id. Packing is allowed.
    #[default]
    NextToken,
    /// Masked LM, token classification: labels `(b, t)`, one per input token, not shifted.
    Token,
    /// Encoder-decoder: `input_ids` are the encoder's input and labels `(b, s)` the decoder's
    /// targets (any length); the model reads them shifted right after its decoder start token,
    /// as transformers does. An example's labels: the target ids (ending with EOS).
    Decoder,
    /// Sequence classification: labels `(b,)`, one class id per row. An example's labels:
    /// `[class]`.
    Sequence,
}

impl Targets {
    pub fn as_str(self) -> &'static str {
        match self {
            Targets::NextToken => "next-token targets",
            Targets::Token => "per-token targets",
            Targets::Decoder => "decoder (sequence-to-sequence) targets",
            Targets::Sequence => "one class per sequence",
        }
    }
}

impl BatchConfig {
    /// The same settings with packing on.
    pub fn with_packing(self) -> Self {
        BatchConfig {
            packing: true,
            ..self
        }
    }
}

/// Where a run is in its data: the next batch is batch `index` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: usize,
    pub index: usize,
}

/// One batch, right padded: the one training batch type of every task (see [`Targets`]).
///
/// With [`Targets::NextToken`] (causal LM) `labels` are `(b, t)` aligned with `input_ids` (the
/// loss compares the logits at `i - 1` with `labels[i]`). The first label of every example is
/// [`IGNORE`]: nothing in the example predicts it, and in a packed row the position before it
/// belongs to another example. So `n_loss_tokens` is exactly the number of tokens the loss
/// sums over (rows, for [`Targets::Sequence`]).
#[derive(Debug)]
pub struct Batch {
    /// `u32 (b, t)`: the sequence (decoders), or the encoder's input (encoders and
    /// encoder-decoders).
    pub input_ids: Tensor,
    /// `i64`, [`IGNORE`] on untrained and padding positions; shape by `targets`.
    pub labels: Tensor,
    /// What `labels` are.
    pub targets: Targets,
    /// `u8`, 1 on tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// `u32`, 0, 1, 2... restarting at the start of each example (so packed examples each see
    /// positions from 0).
    pub position_ids: Tensor,
    /// With packing: `u32`, 1, 2, ... the index of the example within its row, 0 on padding;
    /// attention must stay within a segment.
    pub segment_ids: Option<Tensor>,
    pub n_loss_tokens: usize,
    /// Non-padding tokens.
    pub n_tokens: usize,
    /// The examples in the batch, row by row.
    pub sources: Vec<Source>,
}

/// Whether an example's labels have the shape `targets` gives them.
fn labels_fit(targets: Targets, ex: &Example) -> bool {
    match targets {
        Targets::NextToken | Targets::Token => ex.labels.len() == ex.len(),
        Targets::Decoder => !ex.labels.is_empty(),
        Targets::Sequence => ex.labels.len() == 1,
    }
}

/// A batch plan: batches of rows of example indices.
pub type Plan = Vec<Vec<Vec<usize>>>;

/// Serves batches of a list of examples, epoch after epoch.
pub struct Batcher {
    examples: Vec<Example>,
    cfg: BatchConfig,
    device: Device,
    cursor: DataCursor,
    /// The plan of `cursor.epoch`.
    plan: Plan,
}

impl Batcher {
    pub fn new(examples: Vec<Example>, cfg: BatchConfig, device: Device) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::msg("no training examples to batch"));
        }
        if cfg.batch_size == 0 || cfg.group_window == 0 {
            return Err(Error::msg("batch size and group window must be at least 1"));
        }
        if cfg.packing && cfg.targets != Targets::NextToken {
            return Err(Error::msg(format!(
                "packing is for next-token (causal LM) targets, not {}: set data.packing = false",
                cfg.targets.as_str()
            )));
        }
        if let Some(m) = &cfg.masking {
            if m.targets() != cfg.targets {
                return Err(Error::msg(format!(
                    "{} masking makes {}, but the batches are set up for {}",
                    m.name(),
                    m.targets().as_str(),
                    cfg.targets.as_str()
                )));
            }
        }
        // Raw chunks for a masking objective get their labels when masked.
        let unmasked = cfg.masking.is_none();
        if let Some(ex) = examples
            .iter()
            .find(|e| unmasked && !labels_fit(cfg.targets, e))
        {
            return Err(Error::msg(format!(
                "{}: {} labels for {} input tokens do not fit {}",
                ex.source,
                ex.labels.len(),
                ex.len(),
                cfg.targets.as_str()
            )));
        }
        let input_len = |e: &Example| match &cfg.masking {
            Some(m) => m.input_len(e.len()),
            None => e.len(),
        };
        if let Some(ex) = examples.iter().find(|e| input_len(e) > cfg.max_seq_len) {
            return Err(Error::msg(format!(
                "{}: example is {} tokens, more than max_seq_len {} (apply a length policy first)",
                ex.source,
                input_len(ex),
                cfg.max_seq_len
            )));
        }
        let mut b = Batcher {
            examples,
            cfg,
            device,
            cursor: DataCursor::default(),
            plan: Vec::new(),
        };
        b.plan = b.plan_for(0);
        Ok(b)
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// The batches of one epoch.
    pub fn plan_for(&self, epoch: usize) -> Plan {
        let n = self.examples.len();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(splitmix64(self.cfg.seed ^ splitmix64(epoch as u64)));
        let order = if self.cfg.shuffle {
            permutation(n, &mut rng)
        } else {
            (0..n).collect()
        };
        let len = |i: usize| self.input_len(i);
        let rows: Vec<Vec<usize>> = if self.cfg.packing {
            // Best-fit decreasing: longest first, each into the fullest row it still fits in
            // (a new row if none). Rows come out nearly full, unlike filling rows in shuffled
            // order (77% full on DialogSum at 512 tokens). Row composition is then driven by
            // lengths (ties broken by the shuffled order), so the rows themselves are shuffled.
            let mut by_len = order;
            by_len.sort_by_key(|&i| std::cmp::Reverse(len(i)));
            let mut rows: Vec<Vec<usize>> = Vec::new();
            // (room left, row index) of every row.
            let mut room = std::collections::BTreeSet::new();
            for i in by_len {
                let l = len(i);
                match room.range((l, 0)..).next().copied() {
                    Some((left, r)) => {
                        room.remove(&(left, r));
                        room.insert((left - l, r));
                        rows[r].push(i);
                    }
                    None => {
                        room.insert((self.cfg.max_seq_len - l, rows.len()));
                        rows.push(vec![i]);
                    }
                }
            }
            if self.cfg.shuffle {
                let p = permutation(rows.len(), &mut rng);
                p.into_iter()
                    .map(|r| std::mem::take(&mut rows[r]))
                    .collect()
            } else {
                rows
            }
        } else {
            let window = self.cfg.batch_size * self.cfg.group_window;
            order
                .chunks(window)
                .flat_map(|w| {
                    let mut w = w.to_vec();
                    w.sort_by_key(|&i| std::cmp::Reverse(len(i)));
                    w.into_iter().map(|i| vec![i])
                })
                .collect()
        };
        let mut batches: Plan = rows
            .chunks(self.cfg.batch_size)
            .map(|c| c.to_vec())
            .collect();
        if self.cfg.shuffle && !self.cfg.packing {
            let p = permutation(batches.len(), &mut rng);
            let mut shuffled: Plan = p.into_iter().map(|i| batches[i].clone()).collect();
            // The longest batch goes first, so running out of memory shows at the first step.
            let row_len = |r: &Vec<usize>| r.iter().map(|&i| len(i)).sum::<usize>();
            let longest = (0..shuffled.len())
                .max_by_key(|&b| {
                    (
                        shuffled[b].iter().map(row_len).max().unwrap_or(0),
                        std::cmp::Reverse(b),
                    )
                })
                .unwrap_or(0);
            shuffled.swap(0, longest);
            batches = shuffled;
        }
        batches
    }

    /// Training examples drawn up to the cursor (every earlier epoch whole, this one up to the
    /// cursor), counted by the task each belongs to (`[[tasks]]` names), or else by the file
    /// each came from ([`Source::mix_key`]): the mix of tasks a run actually saw. Computed from
    /// the seeded plan, so a resumed run counts what its earlier sessions drew.
    pub fn seen_per_source(&self) -> std::collections::BTreeMap<String, u64> {
        let mut per_epoch = std::collections::BTreeMap::<String, u64>::new();
        for e in &self.examples {
            *per_epoch.entry(e.source.mix_key()).or_default() += 1;
        }
        let mut seen: std::collections::BTreeMap<String, u64> = per_epoch
            .into_iter()
            .map(|(k, n)| (k, n.saturating_mul(self.cursor.epoch as u64)))
            .collect();
        let drawn = self.plan.iter().take(self.cursor.index).flatten().flatten();
        for e in drawn.filter_map(|&i| self.examples.get(i)) {
            *seen.entry(e.source.mix_key()).or_default() += 1;
        }
        seen.retain(|_, n| *n > 0);
        seen
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Continue from a saved cursor.
    pub fn seek(&mut self, cursor: DataCursor) -> Result<()> {
        if cursor.epoch != self.cursor.epoch {
            self.plan = self.plan_for(cursor.epoch);
        }
        if cursor.index > self.plan.len() {
            return Err(Error::msg(format!(
                "data cursor (epoch {}, batch {}) is past the {} batches of an epoch: the data or batch settings changed since it was saved",
                cursor.epoch,
                cursor.index,
                self.plan.len()
            )));
        }
        self.cursor = cursor;
        Ok(())
    }

    /// The batch at the cursor; the cursor moves on (into the next epoch after the last batch).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let rows = self.advance().to_vec();
        self.build(&rows)
    }

    /// Move the cursor past the batch at it without building it (another rank of a
    /// distributed run trains it): the cursor ends where [`Self::next_batch`] would leave it.
    pub fn skip_batch(&mut self) {
        self.advance();
    }

    /// The rows of the batch at the cursor, moving the cursor on.
    fn advance(&mut self) -> &[Vec<usize>] {
        if self.cursor.index >= self.plan.len() {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.plan = self.plan_for(self.cursor.epoch);
        }
        self.cursor.index += 1;
        &self.plan[self.cursor.index - 1]
    }

    /// Tensors for rows of example indices.
    /// With a masking objective, the masks are those of the cursor's epoch.
    pub fn build(&self, rows: &[Vec<usize>]) -> Result<Batch> {
        self.build_for_epoch(rows, self.cursor.epoch)
    }

    /// Example `i` as trained on in `epoch`: masked when the batches draw masks.
    pub fn example(&self, i: usize, epoch: usize) -> Result<Cow<'_, Example>> {
        let ex = &self.examples[i];
        Ok(match &self.cfg.masking {
            Some(m) => Cow::Owned(m.apply(ex, self.cfg.seed, epoch, i)?),
            None => Cow::Borrowed(ex),
        })
    }

    /// The input length of example `i` once masked (span corruption shortens chunks).
    fn input_len(&self, i: usize) -> usize {
        let n = self.examples[i].len();
        match &self.cfg.masking {
            Some(m) => m.input_len(n),
            None => n,
        }
    }

    /// Tensors for rows of example indices, with the masks of `epoch`.
    pub fn build_for_epoch(&self, rows: &[Vec<usize>], epoch: usize) -> Result<Batch> {
        let exs: Vec<Vec<Cow<'_, Example>>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&i| self.example(i, epoch))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        match self.cfg.targets {
            Targets::NextToken => self.build_next_token(&exs),
            targets => self.build_unpacked(&exs, targets),
        }
    }

    /// Rows of one example each, padded on the right; labels as [`Targets`] says.
    fn build_unpacked(&self, rows: &[Vec<Cow<'_, Example>>], targets: Targets) -> Result<Batch> {
        let exs: Vec<&Example> = rows
            .iter()
            .map(|r| match r.as_slice() {
                [ex] => Ok(ex.as_ref()),
                _ => Err(Error::msg(
                    "a batch row holds one example unless packing (next-token targets)",
                )),
            })
            .collect::<Result<_>>()?;
        let b = exs.len();
        let t = exs.iter().map(|e| e.len()).max().unwrap_or(0);
        let s = match targets {
            Targets::Decoder => exs.iter().map(|e| e.labels.len()).max().unwrap_or(0),
            Targets::Sequence => 1,
            _ => t,
        };
        let mut ids = vec![self.cfg.pad_id; b * t];
        let mut mask = vec![0u8; b * t];
        let mut pos = vec![0u32; b * t];
        let mut labels = vec![IGNORE; b * s];
        let mut n_tokens = 0;
        for (r, ex) in exs.iter().enumerate() {
            for (k, &id) in ex.input_ids.iter().enumerate() {
                ids[r * t + k] = id;
                mask[r * t + k] = 1;
                pos[r * t + k] = k as u32;
            }
            labels[r * s..r * s + ex.labels.len()].copy_from_slice(&ex.labels);
            n_tokens += ex.len();
            if targets == Targets::Decoder {
                // the decoder reads the targets too (shifted right)
                n_tokens += ex.labels.len();
            }
        }
        let n_loss_tokens = labels.iter().filter(|&&l| l != IGNORE).count();
        let dev = &self.device;
        let labels = match targets {
            Targets::Sequence => Tensor::from_vec(labels, b, dev)?,
            _ => Tensor::from_vec(labels, (b, s), dev)?,
        };
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), dev)?,
            labels,
            targets,
            attention_mask: Tensor::from_vec(mask, (b, t), dev)?,
            position_ids: Tensor::from_vec(pos, (b, t), dev)?,
            segment_ids: None,
            n_loss_tokens,
            n_tokens,
            sources: exs.iter().map(|e| e.source.clone()).collect(),
        })
    }

    fn build_next_token(&self, rows: &[Vec<Cow<'_, Example>>]) -> Result<Batch> {
        let b = rows.len();
        let t = rows
            .iter()
            .map(|r| r.iter().map(|ex| ex.len()).sum::<usize>())
            .max()
            .unwrap_or(0);
        let mut ids = vec![self.cfg.pad_id; b * t];
        let mut labels = vec![IGNORE; b * t];
        let mut mask = vec![0u8; b * t];
        let mut pos = vec![0u32; b * t];
        let mut seg = vec![0u32; b * t];
        let mut sources = Vec::new();
        let mut n_tokens = 0;
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * t;
            for (s, ex) in row.iter().enumerate() {
                sources.push(ex.source.clone());
                for (k, (&id, &l)) in ex.input_ids.iter().zip(&ex.labels).enumerate() {
                    ids[at] = id;
                    labels[at] = if k == 0 { IGNORE } else { l };
                    mask[at] = 1;
                    pos[at] = k as u32;
                    seg[at] = s as u32 + 1;
                    at += 1;
                }
                n_tokens += ex.len();
            }
        }
        let n_loss_tokens = labels.iter().filter(|&&l| l != IGNORE).count();
        let dev = &self.device;
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), dev)?,
            labels: Tensor::from_vec(labels, (b, t), dev)?,
            targets: Targets::NextToken,
            attention_mask: Tensor::from_vec(mask, (b, t), dev)?,
            position_ids: Tensor::from_vec(pos, (b, t), dev)?,
            segment_ids: if self.cfg.packing {
                Some(Tensor::from_vec(seg, (b, t), dev)?)
            } else {
                None
            },
            n_loss_tokens,
            n_tokens,
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Loc, Source};
    use std::path::Path;
    use std::sync::Arc;

    /// Example `i` has length `lens[i]`, ids `1000 * (i + 1) + k`, the last half trained.
    fn examples(lens: &[usize]) -> Vec<Example> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let ids: Vec<u32> = (0..n).map(|k| (1000 * (i + 1) + k) as u32).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| if k >= n / 2 { id as i64 } else { IGNORE })
                    .collect();
                Example {
                    input_ids: ids,
                    labels,
                    source: Source {
                        file: Arc::from(Path::new("t.jsonl")),
                        loc: Loc::Line(i + 1),
                        task: None,
                    },
                }
            })
            .collect()
    }

    fn rows2(t: &Tensor) -> Vec<Vec<i64>> {
        t.to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    #[test]
    fn padded_batch_tensors_and_counts() {
        let exs = examples(&[3, 5]);
        let mut cfg = BatchConfig::new(2, 8, 7);
        cfg.shuffle = false;
        let b = Batcher::new(exs, cfg, Device::Cpu).unwrap();
        let batch = b.build(&[vec![0], vec![1]]).unwrap();
        assert_eq!(batch.input_ids.dims(), &[2, 5]);
        assert_eq!(
            rows2(&batch.input_ids),
            vec![
                vec![1000, 1001, 1002, 7, 7],
                vec![2000, 2001, 2002, 2003, 2004]
            ]
        );
        assert_eq!(
            rows2(&batch.labels),
            vec![
                vec![IGNORE, 1001, 1002, IGNORE, IGNORE],
                vec![IGNORE, IGNORE, 2002, 2003, 2004]
            ]
        );
        assert_eq!(
            rows2(&batch.attention_mask),
            vec![vec![1, 1, 1, 0, 0], vec![1; 5]]
        );
        assert_eq!(
            rows2(&batch.position_ids),
            vec![vec![0, 1, 2, 0, 0], vec![0, 1, 2, 3, 4]]
        );
        assert!(batch.segment_ids.is_none());
        assert_eq!(batch.n_tokens, 8);
        assert_eq!(batch.n_loss_tokens, 5);
        assert_eq!(batch.labels.dtype(), candle_core::DType::I64);
        assert_eq!(batch.input_ids.dtype(), candle_core::DType::U32);
    }

    #[test]
    fn examples_seen_are_counted_by_source_across_epochs_and_a_seek() {
        // Examples 0..3 from a.jsonl, 3..10 from b.jsonl; batches of 2 (5 per epoch).
        let mut exs = examples(&[3; 10]);
        for (i, e) in exs.iter_mut().enumerate() {
            let f = if i < 3 { "a.jsonl" } else { "b.jsonl" };
            e.source.file = Arc::from(Path::new(f));
        }
        let cfg = BatchConfig::new(2, 8, 0);
        let mut b = Batcher::new(exs.clone(), cfg.clone(), Device::Cpu).unwrap();
        assert!(b.seen_per_source().is_empty());
        let mut want = std::collections::BTreeMap::<String, u64>::new();
        for _ in 0..7 {
            let (mut e, mut i) = (b.cursor().epoch, b.cursor().index);
            if i == b.batches_per_epoch() {
                (e, i) = (e + 1, 0);
            }
            let plan = b.plan_for(e);
            b.next_batch().unwrap();
            for &k in plan[i].iter().flatten() {
                *want
                    .entry(exs[k].source.file.display().to_string())
                    .or_default() += 1;
            }
        }
        let seen = b.seen_per_source();
        assert_eq!(seen, want);
        assert_eq!(seen.values().sum::<u64>(), 14);
        // One whole epoch is every example once: 3 from a, 7 from b.
        assert!(seen["a.jsonl"] >= 3 && seen["b.jsonl"] >= 7, "{seen:?}");
        // A resumed batcher counts what the earlier session drew.
        let mut resumed = Batcher::new(exs, cfg, Device::Cpu).unwrap();
        resumed.seek(b.cursor()).unwrap();
        assert_eq!(resumed.seen_per_source(), seen);
    }

    #[test]
    fn packing_resets_positions_and_numbers_segments() {
        let exs = examples(&[3, 4, 2, 6]);
        let mut cfg = BatchConfig::new(2, 8, 0);
        cfg.packing = true;
        cfg.shuffle = false;
        let mut b = Batcher::new(exs.clone(), cfg, Device::Cpu).unwrap();
        // Best fit decreasing into rows of 8: 6 opens row 0 (room 2), 4 opens row 1 (room 4),
        // 3 goes to row 1 (room 1), 2 fills row 0.
        assert_eq!(b.plan_for(0), vec![vec![vec![3, 2], vec![1, 0]]]);
        let batch = b.next_batch().unwrap();
        assert_eq!(
            rows2(&batch.position_ids),
            vec![vec![0, 1, 2, 3, 4, 5, 0, 1], vec![0, 1, 2, 3, 0, 1, 2, 0]]
        );
        assert_eq!(
            rows2(batch.segment_ids.as_ref().unwrap()),
            vec![vec![1, 1, 1, 1, 1, 1, 2, 2], vec![1, 1, 1, 1, 2, 2, 2, 0]]
        );
        assert_eq!(
            rows2(&batch.input_ids)[1],
            vec![2000, 2001, 2002, 2003, 1000, 1001, 1002, 0]
        );
        let labels = rows2(&batch.labels);
        // Each example's first label is ignored, including at a segment start mid-row.
        assert_eq!(
            labels[1],
            vec![IGNORE, IGNORE, 2002, 2003, IGNORE, 1001, 1002, IGNORE]
        );
        let trained: usize = exs.iter().map(|e| e.n_trained()).sum();
        assert_eq!(batch.n_loss_tokens, trained);
        assert_eq!(batch.n_tokens, 15);
    }

    #[test]
    fn length_grouping_sorts_within_windows_and_shuffles_deterministically() {
        let lens: Vec<usize> = (0..64).map(|i| 1 + (i * 37) % 31).collect();
        let mut cfg = BatchConfig::new(4, 64, 0);
        cfg.group_window = 4; // windows of 16 examples
        cfg.seed = 3;
        let b = Batcher::new(examples(&lens), cfg.clone(), Device::Cpu).unwrap();
        let plan = b.plan_for(0);
        assert_eq!(plan.len(), 16);
        let mut seen: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
        // Sorting within windows: the spread of lengths inside a batch is far below random.
        let spread: usize = plan
            .iter()
            .map(|bt| {
                let l: Vec<usize> = bt.iter().map(|r| lens[r[0]]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .sum();
        assert!(spread < 16 * 10, "total in-batch spread {spread}");
        // The batch holding the longest example comes first.
        assert!(plan[0]
            .iter()
            .any(|r| lens[r[0]] == *lens.iter().max().unwrap()));
        assert_eq!(
            plan,
            Batcher::new(examples(&lens), cfg.clone(), Device::Cpu)
                .unwrap()
                .plan_for(0)
        );
        assert_ne!(plan, b.plan_for(1));
        cfg.seed = 4;
        assert_ne!(
            plan,
            Batcher::new(examples(&lens), cfg, Device::Cpu)
                .unwrap()
                .plan_for(0)
        );
    }

    #[test]
    fn skipping_a_batch_moves_the_cursor_as_drawing_it_does() {
        // Two epochs of 3 batches: a rank that trains every other batch sees the batches, and
        // ends at the cursor, of one process that trains them all.
        let cfg = BatchConfig::new(2, 16, 0);
        let mut all =
            Batcher::new(examples(&[3, 4, 5, 6, 7, 8]), cfg.clone(), Device::Cpu).unwrap();
        let mut half = Batcher::new(examples(&[3, 4, 5, 6, 7, 8]), cfg, Device::Cpu).unwrap();
        for i in 0..7 {
            let b = all.next_batch().unwrap();
            if i % 2 == 1 {
                let h = half.next_batch().unwrap();
                assert_eq!(rows2(&h.input_ids), rows2(&b.input_ids), "batch {i}");
            } else {
                half.skip_batch();
            }
            assert_eq!(half.cursor(), all.cursor(), "batch {i}");
        }
        assert_eq!(half.cursor(), DataCursor { epoch: 2, index: 1 });
    }

    #[test]
    fn a_restored_cursor_continues_with_the_same_batches() {
        let lens: Vec<usize> = (0..10).map(|i| 2 + i % 4).collect();
        let mut cfg = BatchConfig::new(3, 16, 0);
        cfg.seed = 11;
        let mut a = Batcher::new(examples(&lens), cfg.clone(), Device::Cpu).unwrap();
        assert_eq!(a.batches_per_epoch(), 4);
        let mut saved = None;
        let mut after = Vec::new();
        for step in 0..11 {
            if step == 6 {
                saved = Some(a.cursor());
            }
            let batch = a.next_batch().unwrap();
            if step >= 6 {
                after.push(rows2(&batch.input_ids));
            }
        }
        let cursor = saved.unwrap();
        assert_eq!(cursor, DataCursor { epoch: 1, index: 2 });
        // The cursor survives a JSON round trip (as in a checkpoint).
        let cursor: DataCursor =
            serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
        let mut b = Batcher::new(examples(&lens), cfg, Device::Cpu).unwrap();
        b.seek(cursor).unwrap();
        let resumed: Vec<_> = (0..5)
            .map(|_| rows2(&b.next_batch().unwrap().input_ids))
            .collect();
        assert_eq!(resumed, after);
        assert!(b.seek(DataCursor { epoch: 0, index: 9 }).is_err());
    }

    fn ex(input: &[u32], labels: &[i64], line: usize) -> Example {
        Example {
            input_ids: input.to_vec(),
            labels: labels.to_vec(),
            source: Source {
                file: Arc::from(Path::new("t.jsonl")),
                loc: Loc::Line(line),
                task: None,
            },
        }
    }

    /// Every task's batch: encoder-decoder targets padded on their own length, token labels
    /// unshifted, one class per row; the counts are what the loss sums over.
    #[test]
    fn batches_for_every_kind_of_target() {
        let unpacked = |targets| BatchConfig {
            shuffle: false,
            ..BatchConfig::new(2, 8, 9).with_targets(targets)
        };
        // seq2seq: encoder 3 and 2 tokens, targets 2 and 4 (one ignored)
        let exs = vec![
            ex(&[10, 11, 12], &[20, 21], 1),
            ex(&[13, 14], &[22, IGNORE, 24, 25], 2),
        ];
        let b = Batcher::new(exs, unpacked(Targets::Decoder), Device::Cpu).unwrap();
        let batch = b.build(&[vec![0], vec![1]]).unwrap();
        assert_eq!(batch.targets, Targets::Decoder);
        assert_eq!(
            rows2(&batch.input_ids),
            vec![vec![10, 11, 12], vec![13, 14, 9]]
        );
        assert_eq!(
            rows2(&batch.attention_mask),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!(
            rows2(&batch.labels),
            vec![vec![20, 21, IGNORE, IGNORE], vec![22, IGNORE, 24, 25]]
        );
        assert_eq!(batch.n_loss_tokens, 5);
        assert_eq!(batch.n_tokens, 5 + 6);

        // token labels: not shifted, the first one kept
        let exs = vec![ex(&[1, 2, 3], &[IGNORE, 7, 8], 1), ex(&[4], &[5], 2)];
        let b = Batcher::new(exs, unpacked(Targets::Token), Device::Cpu).unwrap();
        let batch = b.build(&[vec![0], vec![1]]).unwrap();
        assert_eq!(
            rows2(&batch.labels),
            vec![vec![IGNORE, 7, 8], vec![5, IGNORE, IGNORE]]
        );
        assert_eq!(batch.n_loss_tokens, 3);

        // one class per row
        let exs = vec![ex(&[1, 2, 3], &[1], 1), ex(&[4, 5], &[0], 2)];
        let b = Batcher::new(exs, unpacked(Targets::Sequence), Device::Cpu).unwrap();
        let batch = b.build(&[vec![1], vec![0]]).unwrap();
        assert_eq!(batch.labels.dims(), &[2]);
        assert_eq!(batch.labels.to_vec1::<i64>().unwrap(), vec![0, 1]);
        assert_eq!(batch.n_loss_tokens, 2);
        assert_eq!(batch.input_ids.dims(), &[2, 3]);
    }

    #[test]
    fn labels_of_the_wrong_shape_and_packing_other_targets_are_errors() {
        let e = Batcher::new(
            vec![ex(&[1, 2], &[1, 0], 4)],
            BatchConfig::new(1, 8, 0).with_targets(Targets::Sequence),
            Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("t.jsonl: line 4") && e.contains("one class per sequence"),
            "{e}"
        );
        let e = Batcher::new(
            vec![ex(&[1, 2], &[1], 1)],
            BatchConfig::new(1, 8, 0)
                .with_targets(Targets::Decoder)
                .with_packing(),
            Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("packing") && e.contains("data.packing"), "{e}");
    }

    #[test]
    fn too_long_examples_are_rejected() {
        let e = Batcher::new(examples(&[3, 9]), BatchConfig::new(2, 8, 0), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("t.jsonl: line 2") && e.contains("9 tokens"),
            "{e}"
        );
    }
}
