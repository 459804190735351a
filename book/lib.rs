//! The farskip-rs book as doctests: each chapter of `book/src` is this crate's documentation, so
//! `cargo test -p farskip-book` compiles and runs every `rust` block of the book against the workspace crates.
//! `mdbook build book` renders the same files as HTML.

#[doc = include_str!("src/introduction.md")]
pub mod introduction {}

#[doc = include_str!("src/why_farskip.md")]
pub mod why_farskip {}

#[doc = include_str!("src/quick_start.md")]
pub mod quick_start {}

#[doc = include_str!("src/hf_checkpoints.md")]
pub mod hf_checkpoints {}

#[doc = include_str!("src/fcsd.md")]
pub mod fcsd {}

#[doc = include_str!("src/distributed.md")]
pub mod distributed {}

#[doc = include_str!("src/mpi.md")]
pub mod mpi {}

#[doc = include_str!("src/nccl.md")]
pub mod nccl {}

#[doc = include_str!("src/backends.md")]
pub mod backends {}

#[doc = include_str!("src/planner.md")]
pub mod planner {}

#[doc = include_str!("src/new_family.md")]
pub mod new_family {}
