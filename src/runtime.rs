//! The async runtime the commands run their I/O on: one per command run, built here so that every
//! command's synchronous `run` drives its futures the same way.

use crate::error::{Error, Result};
use std::future::Future;

/// Run `f` to completion on a new multi-threaded runtime (2 workers: the machine this runs on
/// is often small, and the work is I/O). Blocking parts inside use
/// `tokio::task::block_in_place`, so they may borrow from the caller.
pub fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(f))
}
