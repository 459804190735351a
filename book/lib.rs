//! The book's chapters as doctests.
