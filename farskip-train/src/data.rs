//! Token streams and batches for training and validation.
//!
//! A corpus is a flat stream of `u32` token ids: bytes from [`ByteCorpus`] (vocab 256) or ids from a Hugging Face
//! tokenizer ([`HfTokenizer`]). [`split_tokens`] keeps the tail as the validation stream, contiguous, so no
//! training window can see validation text. [`RandomBatches`] draws training windows at random offsets from a
//! seeded local PRNG (same seed, same batches); [`ValidationSet`] is a fixed list of windows whose inputs tile the
//! stream without overlap. Both yield `[batch, seq_len + 1]` int tensors: see [`inputs_targets`].
//!
//! What does not live here: anything about the model, and burn-train's dataloader plumbing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;
use thiserror::Error;

/// Errors while loading, splitting or batching token data.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The corpus holds no tokens.
    #[error("corpus {origin} is empty")]
    EmptyCorpus {
        /// Where the corpus came from (a path, or "text").
        origin: String,
    },
    /// A token stream is shorter than one window of `seq_len + 1` tokens.
    #[error("{stream} stream has {len} tokens, fewer than one window of seq_len + 1 = {window}")]
    TooShort {
        /// Which stream: "training" or "validation".
        stream: &'static str,
        /// Its length in tokens.
        len: usize,
        /// Tokens one window needs.
        window: usize,
    },
    /// The validation fraction is not strictly between 0 and 1.
    #[error("valid_fraction {fraction} must lie strictly between 0 and 1")]
    InvalidFraction {
        /// The fraction given.
        fraction: f64,
    },
    /// The split leaves the training or the validation part empty.
    #[error("valid_fraction {fraction} of {len} tokens leaves the {part} part empty")]
    EmptySplit {
        /// The fraction given.
        fraction: f64,
        /// Tokens in the stream being split.
        len: usize,
        /// The empty part: "training" or "validation".
        part: &'static str,
    },
    /// The batch shape is unusable.
    #[error("batch shape seq_len {seq_len}, tokens_per_batch {tokens_per_batch}: {reason}")]
    InvalidBatchShape {
        /// Sequence length asked for.
        seq_len: usize,
        /// Tokens per batch asked for.
        tokens_per_batch: usize,
        /// What is wrong with them.
        reason: &'static str,
    },
    /// A tokenizer file could not be loaded.
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad {
        /// The tokenizer.json at fault.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },
    /// The tokenizer failed on some input.
    #[error("tokenizer {path} failed to {action}: {message}")]
    Tokenize {
        /// The tokenizer.json in use.
        path: PathBuf,
        /// "encode" or "decode".
        action: &'static str,
        /// The tokenizers crate's message.
        message: String,
    },
}

/// A byte-level corpus: every byte is a token, vocab 256. Never empty.
#[derive(Debug, Clone)]
pub struct ByteCorpus {
    bytes: Vec<u8>,
}

impl ByteCorpus {
    /// Number of distinct byte tokens.
    pub const VOCAB_SIZE: usize = 256;

    /// Reads the file's bytes as the corpus.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(bytes, &path.display().to_string())
    }

    /// Uses the UTF-8 bytes of `text` as the corpus.
    pub fn from_text(text: &str) -> Result<Self, DataError> {
        Self::from_bytes(text.as_bytes().to_vec(), "text")
    }

    fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<Self, DataError> {
        if bytes.is_empty() {
            return Err(DataError::EmptyCorpus {
                origin: origin.to_owned(),
            });
        }
        Ok(Self { bytes })
    }

    /// Vocabulary size (always 256).
    pub fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    /// Length in tokens (bytes).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: construction rejects an empty corpus.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The whole corpus as token ids.
    pub fn tokens(&self) -> Vec<u32> {
        self.bytes.iter().map(|&b| u32::from(b)).collect()
    }

    /// Splits into training (head) and validation (tail) streams; see [`split_tokens`].
    pub fn split(&self, valid_fraction: f64) -> Result<CorpusSplit, DataError> {
        split_tokens(&self.tokens(), valid_fraction)
    }
}

/// Training and validation token streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusSplit {
    /// The head of the stream.
    pub train: Vec<u32>,
    /// The contiguous tail of the stream.
    pub valid: Vec<u32>,
}

/// Splits `tokens` so that the last `round(len · valid_fraction)` tokens, contiguous, are validation.
///
/// Errors if `valid_fraction` is not strictly inside (0, 1), or either part would be empty.
pub fn split_tokens(tokens: &[u32], valid_fraction: f64) -> Result<CorpusSplit, DataError> {
    if valid_fraction.is_nan() || valid_fraction <= 0.0 || valid_fraction >= 1.0 {
        return Err(DataError::InvalidFraction {
            fraction: valid_fraction,
        });
    }
    let len = tokens.len();
    let n_valid = (len as f64 * valid_fraction).round() as usize;
    let empty = |part| DataError::EmptySplit {
        fraction: valid_fraction,
        len,
        part,
    };
    if n_valid == 0 {
        return Err(empty("validation"));
    }
    if n_valid >= len {
        return Err(empty("training"));
    }
    let (train, valid) = tokens.split_at(len - n_valid);
    Ok(CorpusSplit {
        train: train.to_vec(),
        valid: valid.to_vec(),
    })
}

/// Sequence length and batch size, the batch size given in tokens: `batch_size = tokens_per_batch / seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    seq_len: usize,
    batch_size: usize,
}

impl BatchShape {
    /// Errors if `seq_len` is 0 or `tokens_per_batch < seq_len` (an empty batch).
    pub fn new(seq_len: usize, tokens_per_batch: usize) -> Result<Self, DataError> {
        let invalid = |reason| DataError::InvalidBatchShape {
            seq_len,
            tokens_per_batch,
            reason,
        };
        if seq_len == 0 {
            return Err(invalid("seq_len must be at least 1"));
        }
        if tokens_per_batch < seq_len {
            return Err(invalid(
                "tokens_per_batch must be at least seq_len (batch size would be 0)",
            ));
        }
        Ok(Self {
            seq_len,
            batch_size: tokens_per_batch / seq_len,
        })
    }

    /// Tokens of model input per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Sequences per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Tokens per window: `seq_len + 1` (inputs plus the shifted target).
    pub fn window(&self) -> usize {
        self.seq_len + 1
    }
}

/// Splits a `[batch, seq_len + 1]` window batch into inputs `[:, :seq_len]` and targets `[:, 1:]`.
///
/// # Shapes
/// - `windows`: `[batch, seq_len + 1]`
/// - output: (`[batch, seq_len]`, `[batch, seq_len]`)
pub fn inputs_targets(windows: Tensor<2, Int>) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let seq_len = windows.dims()[1] - 1;
    (
        windows.clone().narrow(1, 0, seq_len),
        windows.narrow(1, 1, seq_len),
    )
}

/// Endless training batches of windows at random offsets; deterministic for a given seed.
///
/// Each item is a `[batch_size, seq_len + 1]` int tensor; offsets are uniform over every full window.
#[derive(Debug, Clone)]
pub struct RandomBatches {
    tokens: Arc<[u32]>,
    shape: BatchShape,
    rng: SplitMix64,
    device: Device,
}

impl RandomBatches {
    /// Errors with [`DataError::TooShort`] if `tokens` cannot hold one window.
    pub fn new(
        tokens: impl Into<Arc<[u32]>>,
        shape: BatchShape,
        seed: u64,
        device: &Device,
    ) -> Result<Self, DataError> {
        let tokens = tokens.into();
        check_len("training", tokens.len(), shape)?;
        Ok(Self {
            tokens,
            shape,
            rng: SplitMix64(seed),
            device: device.clone(),
        })
    }

    /// The batch shape.
    pub fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The start offsets of the next batch's windows (advances the generator).
    pub fn next_offsets(&mut self) -> Vec<usize> {
        let n_starts = (self.tokens.len() - self.shape.window() + 1) as u64;
        (0..self.shape.batch_size())
            .map(|_| self.rng.below(n_starts) as usize)
            .collect()
    }
}

impl Iterator for RandomBatches {
    type Item = Tensor<2, Int>;

    fn next(&mut self) -> Option<Self::Item> {
        let offsets = self.next_offsets();
        Some(windows_tensor(
            &self.tokens,
            &offsets,
            self.shape.window(),
            &self.device,
        ))
    }
}

/// A fixed validation set: windows at offsets `0, seq_len, 2·seq_len, …`, so inputs never overlap and every
/// token after the first is a target exactly once (the last window's start may leave a short tail unused).
#[derive(Debug, Clone)]
pub struct ValidationSet {
    tokens: Arc<[u32]>,
    shape: BatchShape,
    offsets: Vec<usize>,
}

impl ValidationSet {
    /// Errors with [`DataError::TooShort`] if `tokens` cannot hold one window.
    pub fn new(tokens: impl Into<Arc<[u32]>>, shape: BatchShape) -> Result<Self, DataError> {
        let tokens = tokens.into();
        check_len("validation", tokens.len(), shape)?;
        let offsets = (0..=tokens.len() - shape.window())
            .step_by(shape.seq_len())
            .collect();
        Ok(Self {
            tokens,
            shape,
            offsets,
        })
    }

    /// Keeps at most the first `max_windows` windows (for cheaper evaluation); at least one is kept.
    pub fn truncated(mut self, max_windows: usize) -> Self {
        self.offsets.truncate(max_windows.max(1));
        self
    }

    /// Splits after the first `n` windows: `(first n, the rest)`; the rest is `None` when nothing is left
    /// (`n` is at least 1). The recipe selects checkpoints on the first part and reports on the rest.
    pub fn split_at(mut self, n: usize) -> (Self, Option<Self>) {
        let n = n.clamp(1, self.offsets.len());
        let rest = self.offsets.split_off(n);
        let rest = (!rest.is_empty()).then(|| Self {
            tokens: self.tokens.clone(),
            shape: self.shape,
            offsets: rest,
        });
        (self, rest)
    }

    /// Number of windows.
    pub fn num_windows(&self) -> usize {
        self.offsets.len()
    }

    /// Number of target tokens over all windows.
    pub fn num_targets(&self) -> usize {
        self.offsets.len() * self.shape.seq_len()
    }

    /// Start offsets of the windows, in order.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The windows in order, `batch_size` per batch (the last batch may be smaller).
    ///
    /// # Shapes
    /// - each item: `[batch, seq_len + 1]` with `batch <= batch_size`
    pub fn batches<'a>(&'a self, device: &'a Device) -> impl Iterator<Item = Tensor<2, Int>> + 'a {
        self.offsets
            .chunks(self.shape.batch_size())
            .map(move |chunk| windows_tensor(&self.tokens, chunk, self.shape.window(), device))
    }
}

fn check_len(stream: &'static str, len: usize, shape: BatchShape) -> Result<(), DataError> {
    if len < shape.window() {
        return Err(DataError::TooShort {
            stream,
            len,
            window: shape.window(),
        });
    }
    Ok(())
}

fn windows_tensor(
    tokens: &[u32],
    offsets: &[usize],
    window: usize,
    device: &Device,
) -> Tensor<2, Int> {
    let ids: Vec<i64> = offsets
        .iter()
        .flat_map(|&o| &tokens[o..o + window])
        .map(|&t| i64::from(t))
        .collect();
    Tensor::from_data(TensorData::new(ids, [offsets.len(), window]), device)
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and good enough for picking offsets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by the multiply-high method (bias below n / 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A Hugging Face tokenizer (`tokenizer.json`) producing token ids for a corpus.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl HfTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref().to_owned();
        match tokenizers::Tokenizer::from_file(&path) {
            Ok(inner) => Ok(Self { inner, path }),
            Err(e) => Err(DataError::TokenizerLoad {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens (BOS/EOS): a corpus is one continuous stream.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error("encode", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Reads a UTF-8 text file and encodes it; errors if the file or its encoding is empty.
    pub fn encode_file(&self, path: impl AsRef<Path>) -> Result<Vec<u32>, DataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        let ids = self.encode(&text)?;
        if ids.is_empty() {
            return Err(DataError::EmptyCorpus {
                origin: path.display().to_string(),
            });
        }
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| self.error("decode", e))
    }

    fn error(&self, action: &'static str, e: tokenizers::Error) -> DataError {
        DataError::Tokenize {
            path: self.path.clone(),
            action,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(t: Tensor<2, Int>) -> Vec<i64> {
        t.into_data().try_into_vec_as::<i64>().expect("int data")
    }

    /// A fresh directory under the system temp dir, unique per test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("farskip-train-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn byte_corpus_and_split() {
        let corpus = ByteCorpus::from_text("hello world!").expect("non-empty");
        assert_eq!((corpus.len(), corpus.vocab_size()), (12, 256));
        assert_eq!(&corpus.tokens()[..2], &[104, 101]);
        let split = corpus.split(0.25).expect("valid fraction");
        assert_eq!(
            split.train,
            "hello wor".bytes().map(u32::from).collect::<Vec<_>>()
        );
        assert_eq!(
            split.valid,
            "ld!".bytes().map(u32::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn byte_corpus_from_file() {
        let dir = temp_dir("corpus");
        let path = dir.join("c.txt");
        std::fs::write(&path, [0u8, 255, 7]).expect("write");
        assert_eq!(
            ByteCorpus::from_file(&path).expect("readable").tokens(),
            vec![0, 255, 7]
        );
        std::fs::write(&path, []).expect("write");
        let err = ByteCorpus::from_file(&path).expect_err("empty");
        assert!(
            matches!(err, DataError::EmptyCorpus { .. }) && err.to_string().contains("c.txt"),
            "{err}"
        );
        let err = ByteCorpus::from_file(dir.join("missing.txt")).expect_err("missing");
        assert!(
            matches!(err, DataError::Io { .. }) && err.to_string().contains("missing.txt"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn errors_are_clear() {
        assert_eq!(
            ByteCorpus::from_text("").unwrap_err().to_string(),
            "corpus text is empty"
        );
        let corpus = ByteCorpus::from_text("abcd").expect("non-empty");
        for fraction in [0.0, 1.0, -0.1, f64::NAN] {
            let err = corpus.split(fraction).expect_err("invalid fraction");
            assert!(
                matches!(err, DataError::InvalidFraction { .. }),
                "{fraction}: {err}"
            );
        }
        assert_eq!(
            corpus.split(0.05).unwrap_err().to_string(),
            "valid_fraction 0.05 of 4 tokens leaves the validation part empty"
        );
        assert!(matches!(
            corpus.split(0.9),
            Err(DataError::EmptySplit {
                part: "training",
                ..
            })
        ));
        let shape = BatchShape::new(4, 8).expect("valid shape");
        assert_eq!(
            RandomBatches::new(corpus.tokens(), shape, 0, &Device::flex())
                .unwrap_err()
                .to_string(),
            "training stream has 4 tokens, fewer than one window of seq_len + 1 = 5"
        );
        assert!(matches!(
            ValidationSet::new(corpus.tokens(), shape),
            Err(DataError::TooShort {
                stream: "validation",
                len: 4,
                window: 5
            })
        ));
        assert!(BatchShape::new(0, 8).is_err());
        assert!(
            BatchShape::new(16, 8)
                .unwrap_err()
                .to_string()
                .contains("tokens_per_batch 8")
        );
    }

    #[test]
    fn random_batches_are_deterministic_windows_of_the_stream() {
        let device = Device::flex();
        let tokens: Vec<u32> = (0..1000).collect();
        let shape = BatchShape::new(8, 35).expect("valid shape");
        assert_eq!(shape.batch_size(), 4);
        let mut a = RandomBatches::new(tokens.clone(), shape, 42, &device).expect("long enough");
        let mut b = RandomBatches::new(tokens.clone(), shape, 42, &device).expect("long enough");
        let mut c = RandomBatches::new(tokens, shape, 43, &device).expect("long enough");
        for _ in 0..3 {
            let batch = a.next().expect("endless");
            assert_eq!(batch.dims(), [4, 9]);
            let (ids, same, other) = (
                host(batch),
                host(b.next().expect("endless")),
                host(c.next().expect("endless")),
            );
            assert_eq!(ids, same, "same seed, same batch");
            assert_ne!(ids, other, "different seed, different batch");
            // Tokens equal their positions, so a window from offset o is o, o+1, …, o+8.
            for row in ids.chunks(9) {
                assert!(
                    row.windows(2).all(|w| w[1] == w[0] + 1) && row[8] < 1000,
                    "{row:?}"
                );
            }
        }
    }

    #[test]
    fn random_offsets_cover_every_start() {
        let tokens: Vec<u32> = (0..12).collect();
        let shape = BatchShape::new(3, 30).expect("valid shape");
        let mut batches =
            RandomBatches::new(tokens, shape, 7, &Device::flex()).expect("long enough");
        let mut seen = [0usize; 9];
        for _ in 0..100 {
            for o in batches.next_offsets() {
                seen[o] += 1;
            }
        }
        // 9 possible starts (0..=8), 1000 draws: each should appear ~111 times.
        assert!(seen.iter().all(|&n| (70..160).contains(&n)), "{seen:?}");
    }

    #[test]
    fn inputs_and_targets_are_shifted_by_one() {
        let device = Device::flex();
        let windows = Tensor::<2, Int>::from_data([[1, 2, 3, 4], [5, 6, 7, 8]], &device);
        let (inputs, targets) = inputs_targets(windows);
        assert_eq!(host(inputs), vec![1, 2, 3, 5, 6, 7]);
        assert_eq!(host(targets), vec![2, 3, 4, 6, 7, 8]);
    }

    #[test]
    fn validation_set_tiles_the_stream() {
        let device = Device::flex();
        let tokens: Vec<u32> = (0..23).collect();
        let set = ValidationSet::new(tokens, BatchShape::new(5, 10).expect("valid shape"))
            .expect("long enough");
        // Windows of 6 at 0, 5, 10, 15 (the next, at 20, would need tokens up to 25).
        assert_eq!(set.offsets(), &[0, 5, 10, 15]);
        assert_eq!((set.num_windows(), set.num_targets()), (4, 20));
        let batches: Vec<_> = set.batches(&device).map(host).collect();
        let again: Vec<_> = set.batches(&device).map(host).collect();
        assert_eq!(batches, again, "fixed set");
        assert_eq!(batches.len(), 2);
        assert_eq!(
            batches[1],
            vec![10, 11, 12, 13, 14, 15, 15, 16, 17, 18, 19, 20]
        );
        assert_eq!(set.clone().truncated(3).num_windows(), 3);
        let (first, rest) = set.clone().split_at(1);
        assert_eq!(first.offsets(), &[0]);
        assert_eq!(rest.expect("three left").offsets(), &[5, 10, 15]);
        let (all, none) = set.clone().split_at(9);
        assert_eq!((all.num_windows(), none.is_none()), (4, true));
        assert_eq!(set.split_at(0).0.offsets(), &[0], "at least one window");
    }

    const WORD_LEVEL: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}, "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn hf_tokenizer_encodes_with_a_word_level_model() {
        let dir = temp_dir("tokenizer");
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, WORD_LEVEL).expect("write");
        let tokenizer = HfTokenizer::from_file(&path).expect("valid tokenizer.json");
        assert_eq!(tokenizer.vocab_size(), 4);
        assert_eq!(
            tokenizer.encode("hello world !").expect("encodes"),
            vec![1, 2, 3]
        );
        assert_eq!(tokenizer.encode("hello mars").expect("encodes"), vec![1, 0]);
        let text = dir.join("corpus.txt");
        std::fs::write(&text, "world hello").expect("write");
        assert_eq!(tokenizer.encode_file(&text).expect("encodes"), vec![2, 1]);
        std::fs::write(&text, "").expect("write");
        assert!(matches!(
            tokenizer.encode_file(&text),
            Err(DataError::EmptyCorpus { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn hf_tokenizer_rejects_a_corrupt_file() {
        let dir = temp_dir("corrupt");
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, "{\"model\": 42").expect("write");
        let err = HfTokenizer::from_file(&path).expect_err("corrupt");
        assert!(matches!(err, DataError::TokenizerLoad { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot load tokenizer {}", path.display())),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
