//! [`Pending`]: the handle of an in-flight collective, waited on with a timeout.

use std::fmt;
use std::time::Duration;

use super::CommError;

/// The timeout of a wait when neither the backend nor the caller sets one.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

type Waiter<T> = Box<dyn FnOnce(Duration) -> Result<T, CommError> + Send>;

/// A collective in flight. It completes on the backend's own thread or stream; [`wait`] blocks
/// until the result is there, an error is known, or the timeout passes. Nothing waits forever.
///
/// Dropping a `Pending` without waiting does not cancel the collective (peers still need this
/// rank's contribution), but the result is lost: that is almost always a bug, hence
/// `#[must_use]`.
///
/// [`wait`]: Pending::wait
#[must_use = "a collective's result is only available through .wait()"]
pub struct Pending<T> {
    op: String,
    timeout: Duration,
    waiter: Waiter<T>,
}

impl<T: Send + 'static> Pending<T> {
    /// A pending whose `waiter` is called with the timeout by [`Pending::wait`].
    pub(crate) fn from_waiter(
        op: String,
        timeout: Duration,
        waiter: impl FnOnce(Duration) -> Result<T, CommError> + Send + 'static,
    ) -> Self {
        Self {
            op,
            timeout,
            waiter: Box::new(waiter),
        }
    }

    /// An already completed collective (used by immediate backends and for argument errors).
    pub fn ready(op: impl Into<String>, result: Result<T, CommError>) -> Self {
        Self::from_waiter(op.into(), DEFAULT_TIMEOUT, move |_| result)
    }

    /// The description of the collective, as used in error messages.
    pub fn op(&self) -> &str {
        &self.op
    }

    /// The timeout [`Pending::wait`] will use.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same collective with another wait timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Blocks until the collective completes; fails with [`CommError::Timeout`] after the
    /// timeout, or at once when a peer is known to have failed.
    pub fn wait(self) -> Result<T, CommError> {
        (self.waiter)(self.timeout)
    }

    /// Post-processes the result when it is waited on (on the waiting thread).
    pub fn map<U: Send + 'static>(
        self,
        f: impl FnOnce(T) -> Result<U, CommError> + Send + 'static,
    ) -> Pending<U> {
        let waiter = self.waiter;
        Pending {
            op: self.op,
            timeout: self.timeout,
            waiter: Box::new(move |timeout| waiter(timeout).and_then(f)),
        }
    }
}

impl<T> fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("op", &self.op)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
