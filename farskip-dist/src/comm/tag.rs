//! Labels of a collective: what the caller says it is ([`CollectiveTag`]) and what a backend
//! compares across ranks to detect mismatched calls ([`CollectiveCall`]).

use std::borrow::Cow;
use std::fmt;

use crate::trace::Phase;

/// The kind of a collective operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CollectiveKind {
    /// Element-wise sum over ranks.
    AllReduce,
    /// Personalised exchange of rows with per-peer counts.
    AllToAllV,
    /// Concatenation over ranks.
    AllGather,
    /// Sum over ranks, each rank keeping one chunk.
    ReduceScatter,
    /// One rank's buffer to all.
    Broadcast,
    /// Synchronisation only.
    Barrier,
}

impl CollectiveKind {
    /// The snake-case name used in messages and traces (`"all_to_all_v"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllToAllV => "all_to_all_v",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
            Self::Broadcast => "broadcast",
            Self::Barrier => "barrier",
        }
    }

    /// A stable small integer for wire formats (NCCL call verification).
    pub fn code(self) -> u64 {
        match self {
            Self::AllReduce => 1,
            Self::AllToAllV => 2,
            Self::AllGather => 3,
            Self::ReduceScatter => 4,
            Self::Broadcast => 5,
            Self::Barrier => 6,
        }
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The caller's label for a collective: which step of the schedule issued it.
///
/// All ranks must label the same collective the same way; a different tag at the same position
/// in the sequence is reported as a mismatch. The tag also names the collective in traces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollectiveTag {
    /// What the collective is for, in the paper's words (`"dispatch"`, `"combine"`, `"attn_out"`).
    pub name: Cow<'static, str>,
    /// The decoder layer it belongs to, if any.
    pub layer: Option<usize>,
    /// The pass it belongs to.
    pub phase: Phase,
}

impl CollectiveTag {
    /// A forward-pass tag with no layer.
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            layer: None,
            phase: Phase::Forward,
        }
    }

    /// The same tag attached to decoder layer `layer`.
    pub fn at_layer(mut self, layer: usize) -> Self {
        self.layer = Some(layer);
        self
    }

    /// The same tag in pass `phase`.
    pub fn in_phase(mut self, phase: Phase) -> Self {
        self.phase = phase;
        self
    }
}

impl fmt::Display for CollectiveTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.name)?;
        if let Some(layer) = self.layer {
            write!(f, " layer {layer}")?;
        }
        write!(f, " ({})", self.phase)
    }
}

/// The sizes of a call that must agree across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallShape {
    /// `all_reduce`, `all_gather`, `reduce_scatter`: the buffer length in elements.
    Elements {
        /// Number of f32 elements.
        len: usize,
    },
    /// `broadcast`: the root and the buffer length.
    Broadcast {
        /// The sending rank.
        root: usize,
        /// Number of f32 elements.
        len: usize,
    },
    /// `all_to_all_v`: the row length (the row counts differ per rank by design).
    Rows {
        /// Elements per row.
        row_len: usize,
    },
    /// `barrier`: nothing to agree on.
    Empty,
}

impl fmt::Display for CallShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elements { len } => write!(f, "len {len}"),
            Self::Broadcast { root, len } => write!(f, "root {root}, len {len}"),
            Self::Rows { row_len } => write!(f, "row_len {row_len}"),
            Self::Empty => f.write_str("no data"),
        }
    }
}

/// One rank's view of one collective: kind, tag and the sizes that must agree across ranks.
/// Two ranks' calls at the same position in the sequence must be equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollectiveCall {
    /// The operation.
    pub kind: CollectiveKind,
    /// The caller's label.
    pub tag: CollectiveTag,
    /// Sizes that must agree.
    pub shape: CallShape,
}

impl CollectiveCall {
    /// Length of the fixed-size wire encoding ([`CollectiveCall::to_words`]).
    pub const WORDS: usize = 10;

    /// Bytes of the tag name kept by the wire encoding (longer names are truncated).
    pub const NAME_BYTES: usize = 32;

    /// A fixed-size encoding for comparing calls across processes (NCCL call verification):
    /// kind, shape, layer, phase and the first [`CollectiveCall::NAME_BYTES`] bytes of the name.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        let (shape_kind, a, b) = match self.shape {
            CallShape::Elements { len } => (0, len, 0),
            CallShape::Broadcast { root, len } => (1, root, len),
            CallShape::Rows { row_len } => (2, row_len, 0),
            CallShape::Empty => (3, 0, 0),
        };
        let mut name = [0u8; Self::NAME_BYTES];
        let mut end = self.tag.name.len().min(Self::NAME_BYTES);
        while !self.tag.name.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].copy_from_slice(&self.tag.name.as_bytes()[..end]);
        let mut words = [0u64; Self::WORDS];
        words[0] = self.kind.code();
        words[1] = shape_kind;
        words[2] = a as u64;
        words[3] = b as u64;
        // 0: no layer; l + 1 otherwise, with usize::MAX (the tag of the embedding/head gradient all-reduce) as
        // u64::MAX instead of overflowing.
        words[4] = self.tag.layer.map_or(0, |l| (l as u64).saturating_add(1));
        words[5] = match self.tag.phase {
            Phase::Forward => 0,
            Phase::Backward => 1,
        };
        for (w, chunk) in words[6..].iter_mut().zip(name.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *w = u64::from_le_bytes(bytes);
        }
        words
    }

    /// Decodes [`CollectiveCall::to_words`]; `None` for words no call encodes to.
    pub fn from_words(words: &[u64; Self::WORDS]) -> Option<Self> {
        let kind = [
            CollectiveKind::AllReduce,
            CollectiveKind::AllToAllV,
            CollectiveKind::AllGather,
            CollectiveKind::ReduceScatter,
            CollectiveKind::Broadcast,
            CollectiveKind::Barrier,
        ]
        .into_iter()
        .find(|k| k.code() == words[0])?;
        let (a, b) = (
            usize::try_from(words[2]).ok()?,
            usize::try_from(words[3]).ok()?,
        );
        let shape = match words[1] {
            0 => CallShape::Elements { len: a },
            1 => CallShape::Broadcast { root: a, len: b },
            2 => CallShape::Rows { row_len: a },
            3 => CallShape::Empty,
            _ => return None,
        };
        let layer = match words[4] {
            0 => None,
            u64::MAX => Some(usize::MAX),
            l => Some(usize::try_from(l - 1).ok()?),
        };
        let phase = match words[5] {
            0 => Phase::Forward,
            1 => Phase::Backward,
            _ => return None,
        };
        let bytes: Vec<u8> = words[6..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let name = String::from_utf8_lossy(&bytes[..len]).into_owned();
        Some(Self {
            kind,
            tag: CollectiveTag {
                name: name.into(),
                layer,
                phase,
            },
            shape,
        })
    }
}

impl fmt::Display for CollectiveCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({}, {})", self.kind, self.tag, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_encoding_round_trips_and_truncates_long_names() {
        let call = CollectiveCall {
            kind: CollectiveKind::Broadcast,
            tag: CollectiveTag::new("combine")
                .at_layer(7)
                .in_phase(Phase::Backward),
            shape: CallShape::Broadcast { root: 2, len: 99 },
        };
        assert_eq!(CollectiveCall::from_words(&call.to_words()), Some(call));
        // The embedding/head gradient all-reduce is tagged with layer usize::MAX.
        let outer = CollectiveCall {
            kind: CollectiveKind::AllReduce,
            tag: CollectiveTag::new("grad_allreduce").at_layer(usize::MAX),
            shape: CallShape::Elements { len: 3 },
        };
        assert_eq!(CollectiveCall::from_words(&outer.to_words()), Some(outer));
        let long = CollectiveCall {
            kind: CollectiveKind::Barrier,
            tag: CollectiveTag::new("é".repeat(20)),
            shape: CallShape::Empty,
        };
        let back = CollectiveCall::from_words(&long.to_words());
        assert_eq!(back.map(|c| c.tag.name.into_owned()), Some("é".repeat(16)));
        assert_eq!(
            CollectiveCall::from_words(&[0; CollectiveCall::WORDS]),
            None
        );
    }
}
